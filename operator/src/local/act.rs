//! Carrying out membership steps on local members, and reporting each as an event: a log
//! line and a line in `DIR/<name>.events` (the local stand-in for Kubernetes events), so a
//! person or a test can follow a scale step by step.

use std::io::Write;
use std::path::{Path, PathBuf};

use k8s_openapi::jiff::Timestamp;

use super::Seen;
use super::workload::Workload;
use crate::membership::{EtcdMembers, Members, MembershipError};
use crate::plan::Step;

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Membership(#[from] MembershipError),
    #[error(transparent)]
    Local(#[from] super::LocalError),
    #[error("a backup was planned without a destination (neither its request nor spec.backup names one)")]
    NoBackupDestination,
    #[error("member {0} is not among the running members")]
    NoSuchMember(String),
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

/// Carries out one membership step at the leader's own address (a change sent to another
/// member is forwarded, but a member the change removes never passes the answer back, and
/// MoveLeader is refused off the leader). The caller retries a failure on the next
/// reconcile, which is safe because every operation is idempotent.
pub async fn membership_step(
    workload: &mut Workload,
    events: &mut Events,
    members: &EtcdMembers,
    cluster: &str,
    step: &Step,
    seen: &Seen,
) -> Result<(), StepError> {
    let observed = &seen.observed;
    let leader_url = || seen.leader_url.as_deref().ok_or(MembershipError::NoLeader);
    let leader = observed.leader.map(|id| observed.member_name(id)).unwrap_or_default();
    match step {
        Step::AddLearner { name } => {
            let member = workload.reserve(name)?;
            let id = members.add_learner(leader_url()?, &member.peer_url()).await?;
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
            members.change_voters(leader_url()?, voters).await?;
            let names: Vec<String> = voters.iter().map(|id| observed.member_name(*id)).collect();
            events.emit("VotersChanged", &format!("voters={} ({})", voters.len(), names.join(",")));
        }
        Step::TransferLeadership { to } => {
            members.move_leader(leader_url()?, *to).await?;
            events.emit(
                "LeadershipTransferred",
                &format!("from={leader} to={} id={to:x}", observed.member_name(*to)),
            );
        }
        Step::RemoveMember { id, name } => {
            members.remove(leader_url()?, *id).await?;
            events.emit("MemberRemoved", &format!("{name} id={id:x} leader={leader}"));
        }
        Step::DeleteVolume { name } => {
            workload.delete_volume(name)?;
            events.emit("VolumeDeleted", name);
        }
        // Locally no member is ever outdated, so no update is planned (see `observe`).
        Step::RefuseSpec { .. }
        | Step::CreateWorkload { .. }
        | Step::Wait { .. }
        | Step::Steady
        | Step::UpdateMember { .. }
        | Step::TakeBackup { .. }
        | Step::BeginRecovery { .. }
        | Step::Recover { .. } => {}
    }
    Ok(())
}
