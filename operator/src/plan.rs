//! The pure planner: (spec, observation) -> the single next step, and the status that
//! describes it. No I/O.
//!
//! This is a minimal stand-in with the agreed interface so the Kubernetes platform can be
//! built against it; the full planner (membership changes, scaling, recovery) replaces
//! this file when the `op-local` branch is merged.

use consensus_crds::{
    ConsensusClusterSpec, ConsensusClusterStatus, MemberRole, MemberStatus, Phase, condition, validate_spec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// What the platform saw, as it saw it. `None` means "could not be observed", which the
/// planner must not confuse with "observed to be empty".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    pub generation: Option<i64>,
    pub workload_replicas: Option<i32>,
    pub members: Option<Vec<ObservedMember>>,
    pub leader: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ObservedMember {
    pub id: u64,
    pub name: String,
    pub is_learner: bool,
    pub healthy: bool,
    pub zone: Option<String>,
    pub applied_index: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The spec must not be acted on; nothing changes until it is fixed.
    RefuseSpec {
        reason: String,
    },
    /// No workload exists yet: create it with this many members, who bootstrap together.
    CreateWorkload {
        replicas: i32,
    },
    /// Something is in progress; observe again later.
    Wait {
        reason: String,
    },
    Steady,
}

pub fn plan(spec: &ConsensusClusterSpec, observed: &Observed) -> Step {
    let problems = validate_spec(spec);
    if !problems.is_empty() {
        let reason = problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
        return Step::RefuseSpec { reason };
    }
    match observed.workload_replicas {
        None => Step::CreateWorkload { replicas: spec.replicas },
        Some(_) => Step::Steady,
    }
}

pub fn status(
    spec: &ConsensusClusterSpec,
    observed: &Observed,
    step: &Step,
    previous: Option<&ConsensusClusterStatus>,
    now: Time,
) -> ConsensusClusterStatus {
    let members = observed.members.clone().unwrap_or_default();
    let leader = observed.leader.and_then(|id| members.iter().find(|m| m.id == id));
    let ready = members.iter().filter(|m| m.healthy && !m.is_learner).count();
    let voters = members.iter().filter(|m| !m.is_learner).count();
    let quorum = voters / 2 + 1;
    let has_quorum = voters > 0 && ready >= quorum;
    let phase = match step {
        Step::RefuseSpec { .. } => Phase::Degraded,
        Step::CreateWorkload { .. } => Phase::Pending,
        Step::Wait { .. } if observed.members.is_none() => Phase::Pending,
        Step::Wait { .. } => Phase::Bootstrapping,
        Step::Steady if leader.is_none() && voters > 0 && !has_quorum => Phase::QuorumLost,
        Step::Steady if leader.is_none() => Phase::Bootstrapping,
        Step::Steady if ready < usize::try_from(spec.replicas).unwrap_or(0) => Phase::Degraded,
        Step::Steady => Phase::Running,
    };
    let previous_conditions = previous.map(|p| p.conditions.as_slice()).unwrap_or_default();
    let make = |type_: &str, ok: bool, reason: &str, message: String| {
        condition(previous_conditions, type_, ok, reason, message, observed.generation, &now)
    };
    let degraded = match step {
        Step::RefuseSpec { reason } => make(condition::DEGRADED, true, "InvalidSpec", reason.clone()),
        _ if leader.is_some() && ready < voters => {
            make(condition::DEGRADED, true, "MemberUnhealthy", format!("{ready} of {voters} voters healthy"))
        }
        _ => make(condition::DEGRADED, false, "AsExpected", String::new()),
    };
    let progressing = match step {
        Step::CreateWorkload { replicas } => {
            make(condition::PROGRESSING, true, "Creating", format!("creating {replicas} members"))
        }
        Step::Wait { reason } => make(condition::PROGRESSING, true, "Waiting", reason.clone()),
        _ => make(condition::PROGRESSING, false, "AsExpected", String::new()),
    };
    let available = match leader {
        Some(l) => make(condition::AVAILABLE, true, "LeaderElected", format!("{} leads", l.name)),
        None => make(condition::AVAILABLE, false, "NoLeader", "no leader is known".to_owned()),
    };
    ConsensusClusterStatus {
        observed_generation: observed.generation,
        phase: Some(phase),
        replicas: observed.workload_replicas.unwrap_or(0),
        ready_replicas: i32::try_from(ready).unwrap_or(i32::MAX),
        members: members
            .iter()
            .map(|m| MemberStatus {
                name: m.name.clone(),
                id: format!("{:x}", m.id),
                role: if m.is_learner {
                    MemberRole::Learner
                } else if Some(m.id) == observed.leader {
                    MemberRole::Leader
                } else {
                    MemberRole::Follower
                },
                zone: m.zone.clone(),
                healthy: m.healthy,
                applied_index: m.applied_index,
            })
            .collect(),
        leader: leader.map(|l| l.name.clone()),
        conditions: vec![available, progressing, degraded],
        ..previous.cloned().unwrap_or_default()
    }
}

/// A condition whose lastTransitionTime moves only when its status does, as the API
/// conventions ask.
fn condition(
    previous: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if ok { "True" } else { "False" }.to_owned();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_owned(),
        status,
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(replicas: i32) -> ConsensusClusterSpec {
        serde_json::from_value(serde_json::json!({ "replicas": replicas })).expect("spec parses")
    }

    #[test]
    fn invalid_specs_are_refused_whatever_is_observed() {
        let observed = Observed { workload_replicas: Some(3), ..Observed::default() };
        assert!(
            matches!(plan(&spec(4), &observed), Step::RefuseSpec { reason } if reason.contains("replicas"))
        );
        assert!(matches!(plan(&spec(11), &Observed::default()), Step::RefuseSpec { .. }));
    }

    #[test]
    fn a_missing_workload_is_created_at_the_declared_size() {
        assert_eq!(plan(&spec(5), &Observed::default()), Step::CreateWorkload { replicas: 5 });
        let observed = Observed { workload_replicas: Some(5), ..Observed::default() };
        assert_eq!(plan(&spec(5), &observed), Step::Steady);
    }

    #[test]
    fn a_refusal_is_a_degraded_condition_with_reason_invalid_spec() {
        let step = Step::RefuseSpec { reason: "spec.replicas: 4".into() };
        let now = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let status = status(&spec(4), &Observed::default(), &step, None, now);
        assert_eq!(status.phase, Some(Phase::Degraded));
        let degraded = status.conditions.iter().find(|c| c.type_ == condition::DEGRADED).expect("degraded");
        assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "InvalidSpec"));
    }
}
