//! Carrying out membership steps on local members, and reporting each as an event: a log
//! line and a line in `DIR/<name>.events` (the local stand-in for Kubernetes events), so a
//! person or a test can follow a scale step by step.

use std::io::Write;
use std::path::{Path, PathBuf};

use k8s_openapi::jiff::Timestamp;

use super::workload::Workload;
use crate::membership::{MemberOps, MembershipError};
use crate::plan::{Observed, Step};

/// Exit status of a run killed by the fault point, distinct from any error exit.
pub const FAULT_EXIT: i32 = 86;
const FAULT_ENV: &str = "CONSENSUS_OPERATOR_FAULT_AFTER";

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Membership(#[from] MembershipError),
    #[error(transparent)]
    Local(#[from] super::LocalError),
    #[error("no healthy member to send the change to")]
    NoHealthyMember,
}

/// The step name after which this run should die, from `CONSENSUS_OPERATOR_FAULT_AFTER`.
pub fn fault_after() -> Option<String> {
    std::env::var(FAULT_ENV).ok().filter(|s| !s.is_empty())
}

/// Dies as a crash would: no cleanup, members left running in their own process groups,
/// for the next run to adopt.
pub fn die_after(step: &Step) -> ! {
    tracing::error!(step = step.name(), "{FAULT_ENV}: exiting right after this step");
    std::process::exit(FAULT_EXIT)
}

pub struct Events {
    path: PathBuf,
}

impl Events {
    pub fn new(state_dir: &Path, cluster: &str) -> Self {
        Self { path: state_dir.join(format!("{cluster}.events")) }
    }

    /// `<time> <reason> <message>`, one line per event, appended.
    pub fn emit(&mut self, reason: &str, message: &str) {
        tracing::info!(event = reason, "{message}");
        let line = format!("{} {reason} {message}\n", Timestamp::now());
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(err) = written {
            tracing::warn!("writing {}: {err}", self.path.display());
        }
    }
}

/// Connects to the leader, which carries out every membership change: a call sent to
/// another member is forwarded, and a member the change removes never passes the answer
/// back (the call then hangs until its timeout). Without a known leader, the healthy voters.
async fn ops(workload: &Workload, observed: &Observed) -> Result<MemberOps, StepError> {
    let members: Vec<&crate::plan::ObservedMember> = observed.members.iter().flatten().collect();
    let leader = observed.leader.and_then(|id| members.iter().find(|m| m.id == id)).map(|m| m.name.as_str());
    let healthy_voters: Vec<&str> =
        members.iter().filter(|m| m.healthy && !m.is_learner).map(|m| m.name.as_str()).collect();
    let url_of = |name: &str| workload.members().iter().find(|m| m.name == name).map(|m| m.client_url());
    let endpoints: Vec<String> = match leader.and_then(url_of) {
        Some(url) => vec![url],
        None => healthy_voters.into_iter().filter_map(url_of).collect(),
    };
    if endpoints.is_empty() {
        return Err(StepError::NoHealthyMember);
    }
    Ok(MemberOps::connect(&endpoints).await?)
}

/// Carries out one membership step; the caller retries a failure on the next reconcile,
/// which is safe because every operation is idempotent.
pub async fn membership_step(
    workload: &mut Workload,
    events: &mut Events,
    cluster: &str,
    step: &Step,
    observed: &Observed,
) -> Result<(), StepError> {
    let leader = observed.leader.map(|id| observed.member_name(id)).unwrap_or_default();
    match step {
        Step::AddLearner { name } => {
            let member = workload.reserve(name)?;
            let id = ops(workload, observed).await?.add_learner(&member.peer_url()).await?;
            workload.added(name)?;
            events.emit("MemberAdded", &format!("{name} id={id:x} peer={} as a learner", member.peer_url()));
        }
        Step::ResizeWorkload { replicas } => {
            workload.resize(cluster, *replicas).await?;
            events.emit("WorkloadResized", &format!("replicas={replicas}"));
        }
        Step::ChangeVoters { voters } => {
            for member in observed.members.iter().flatten().filter(|m| m.is_learner && voters.contains(&m.id))
            {
                events.emit(
                    "LearnerCaughtUp",
                    &format!(
                        "{} id={:x} applied={} leader_index={}",
                        member.name,
                        member.id,
                        member.applied_index.unwrap_or(0),
                        observed.leader_raft_index.unwrap_or(0)
                    ),
                );
            }
            ops(workload, observed).await?.change_voters(voters).await?;
            let names: Vec<String> = voters.iter().map(|id| observed.member_name(*id)).collect();
            events.emit("VotersChanged", &format!("voters={} ({})", voters.len(), names.join(",")));
        }
        Step::TransferLeadership { to } => {
            ops(workload, observed).await?.move_leader(*to).await?;
            events.emit(
                "LeadershipTransferred",
                &format!("from={leader} to={} id={to:x}", observed.member_name(*to)),
            );
        }
        Step::RemoveMember { id, name } => {
            ops(workload, observed).await?.remove(*id).await?;
            events.emit("MemberRemoved", &format!("{name} id={id:x} leader={leader}"));
        }
        Step::DeleteVolume { name } => {
            workload.delete_volume(name)?;
            events.emit("VolumeDeleted", name);
        }
        Step::RefuseSpec { .. } | Step::CreateWorkload { .. } | Step::Wait { .. } | Step::Steady => {}
    }
    Ok(())
}
