//! The planner: from a spec and an observation of the cluster to the single next step, and
//! the status that tells the truth about both. Pure: no I/O, no clock (the time is passed
//! in), so every safety rule is a unit or property test and both platforms (Kubernetes and
//! local processes) share the same decisions.
//!
//! `assess` names the situation first and `plan` maps it to a step; membership changes
//! (adding learners, changing the voters, removing members) are worked out in
//! `scaling.rs`, backups (scheduled and asked for) in `backup.rs`, quorum loss in
//! `recovery.rs`. `status` derives its conditions from the situation, not the step's text.

use std::collections::BTreeMap;

use consensus_crds::{
    ConsensusClusterSpec, ConsensusClusterStatus, ExistingVolumePolicy, MemberRole, MemberStatus, Phase,
    condition, validate_spec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use backup::{BackupRequest, BackupRun};
use consensus_crds::{BackupRecord, RecoveryRecord};

/// What the platform saw of one cluster in this reconcile.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observed {
    /// `metadata.generation` of the resource the spec came from.
    pub generation: Option<i64>,
    /// StatefulSet replicas or local member processes; `None` = not created.
    pub workload_replicas: Option<i32>,
    /// MemberList + Status from the members; `None` = no member answered.
    pub members: Option<Vec<ObservedMember>>,
    /// Raft id of the leader, as the members report it.
    pub leader: Option<u64>,
    /// Raft cluster id from the members' response headers.
    pub cluster_id: Option<u64>,
    /// The leader's Status `raft_index`: learners are caught up when their applied index is
    /// within `LEARNER_CAUGHT_UP_ENTRIES` of it.
    pub leader_raft_index: Option<u64>,
    /// Names of members whose volume (PVC, or data directory locally) exists.
    pub volumes: Vec<String>,
    /// Names of members known to have lost their data since they were last added (an empty
    /// volume under a member the cluster lists). A member added again by `AddLearner` is no
    /// longer in it: it joins with a new id.
    pub lost_data: Vec<String>,
    /// A cluster has run under this resource (its id is in status): members created again
    /// rejoin it from their volumes and never found a new one.
    pub established: bool,
    /// Member volumes older than the resource, left by an earlier cluster of the same name.
    pub kept_volumes: Vec<String>,
    /// Spec changes the platform cannot carry out, each with why; the rest of the spec is
    /// still converged.
    pub refused_changes: Vec<String>,
    /// When the platform looked: the backup schedule is judged at this time.
    pub now: Timestamp,
    /// `status.lastScheduledBackup`: the schedule's slot last started.
    pub last_scheduled_backup: Option<Timestamp>,
    /// The backup runs the platform has (Jobs, processes), going and finished.
    pub backup_runs: Vec<BackupRun>,
    /// The backups asked for now (ConsensusBackups, request files), ended ones too.
    pub backup_requests: Vec<BackupRequest>,
    /// `status.lastBackup`: the newest verified backup, which a recovery may come from.
    pub last_backup: Option<BackupRecord>,
    /// When the cluster lost its quorum, while it has not regained it (status says).
    pub quorum_lost_since: Option<Timestamp>,
    /// `status.recovery`: a recovery from quorum loss under way.
    pub recovery: Option<RecoveryRecord>,
    /// The `consensus.dev/recover` annotation: a recovery asked for by hand.
    pub recovery_request: Option<String>,
    /// `status.clusterId`: the cluster's id as last seen, when no member answers now.
    pub status_cluster_id: Option<String>,
    /// Where `spec.backup.destination` keeps this cluster's backups, as the platform reaches
    /// them (`resources::backup::destination_url`); a new cluster made from a backup takes
    /// the newest verified one there unless one is named.
    pub backup_destination: Option<String>,
}

impl Observed {
    /// A member's name for events and logs: its id in hex when the members do not list it.
    pub fn member_name(&self, id: u64) -> String {
        self.members
            .iter()
            .flatten()
            .find(|m| m.id == id)
            .map_or_else(|| format!("{id:x}"), |m| m.name.clone())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedMember {
    pub id: u64,
    /// `<cluster>-<ordinal>`. etcd lists a member added but not yet started with an empty
    /// name: the platform resolves it from the member's peer URL before planning, since
    /// the planner tells members apart by name.
    pub name: String,
    pub is_learner: bool,
    /// Answers on the etcd API and knows a leader (and on Kubernetes, its pod is ready).
    pub healthy: bool,
    /// `None` when the member's node has no zone label (every member on one machine, locally).
    pub zone: Option<String>,
    pub applied_index: Option<u64>,
    /// Whether it runs an older template than the workload's (version, image, resources):
    /// due to be restarted onto the new one. `None` while that is not known (the workload's
    /// controller has not worked out its new template yet).
    pub outdated: Option<bool>,
}

/// The single next thing the platform should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// An invalid spec reached us: change nothing.
    RefuseSpec { reason: String },
    /// The workload, with `replicas` members. With `bootstrap` they found a new cluster
    /// together; without, a cluster has run here before and they rejoin it from their
    /// volumes (a deleted StatefulSet, adopted volumes).
    CreateWorkload { replicas: i32, bootstrap: bool },
    /// MemberAdd --learner with that member's peer URL (the platform knows it by name).
    AddLearner { name: String },
    /// StatefulSet replicas, or the number of member processes locally.
    ResizeWorkload { replicas: i32 },
    /// Admin/ChangeVoters: the whole voter set in one joint-consensus step.
    ChangeVoters { voters: Vec<u64> },
    /// MoveLeader, before the leader leaves the voters.
    TransferLeadership { to: u64 },
    /// MemberRemove: a learner left out of the voters, or a member that lost its data.
    RemoveMember { id: u64, name: String },
    /// The PVC (data directory locally) of a member that is gone.
    DeleteVolume { name: String },
    /// Restarts member `name` onto the workload's current template, on its own volume (its
    /// pod deleted, for the StatefulSet to create it again).
    UpdateMember { name: String },
    /// Starts the backup for the schedule's `slot` (its `attempt`-th try), a snapshot taken
    /// from member `from` and streamed to `spec.backup.destination` by a Job or process.
    /// With `request`, the backup that ConsensusBackup asked for, made at `slot`.
    TakeBackup { slot: Timestamp, attempt: u32, from: String, request: Option<String> },
    /// Records a recovery from quorum loss in status before anything is changed: what the
    /// new cluster is made from.
    BeginRecovery { record: Box<RecoveryRecord> },
    /// Makes the cluster again from the recorded source under its new token: the first
    /// member restored from it, the others stopped and their data put away. Carried out
    /// idempotently until a member answers under the new cluster id.
    Recover { record: Box<RecoveryRecord> },
    /// Nothing to do until the situation changes; `reason` says what we wait for.
    Wait { reason: String },
    /// The cluster is in its declared shape.
    Steady,
}

impl Step {
    /// Whether carrying out this step changes the cluster or the resources it runs on.
    pub fn changes_cluster(&self) -> bool {
        match self {
            Step::CreateWorkload { .. }
            | Step::AddLearner { .. }
            | Step::ResizeWorkload { .. }
            | Step::ChangeVoters { .. }
            | Step::TransferLeadership { .. }
            | Step::RemoveMember { .. }
            | Step::DeleteVolume { .. }
            | Step::UpdateMember { .. }
            | Step::Recover { .. } => true,
            Step::RefuseSpec { .. }
            | Step::Wait { .. }
            | Step::Steady
            | Step::TakeBackup { .. }
            | Step::BeginRecovery { .. } => false,
        }
    }

    /// The step's name, as reported in `Progressing` and in events and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Step::RefuseSpec { .. } => "RefuseSpec",
            Step::CreateWorkload { .. } => "CreateWorkload",
            Step::AddLearner { .. } => "AddLearner",
            Step::ResizeWorkload { .. } => "ResizeWorkload",
            Step::ChangeVoters { .. } => "ChangeVoters",
            Step::TransferLeadership { .. } => "TransferLeadership",
            Step::RemoveMember { .. } => "RemoveMember",
            Step::DeleteVolume { .. } => "DeleteVolume",
            Step::UpdateMember { .. } => "UpdateMember",
            Step::TakeBackup { .. } => "TakeBackup",
            Step::BeginRecovery { .. } => "BeginRecovery",
            Step::Recover { .. } => "Recover",
            Step::Wait { .. } => "Wait",
            Step::Steady => "Steady",
        }
    }
}

/// Votes needed for a decision among `voters`.
pub fn quorum(voters: usize) -> usize {
    voters / 2 + 1
}

/// True only when losing any one zone leaves a quorum of healthy voters. Members without a
/// zone count as one zone of their own: nothing says they are spread, so we assume they
/// are not.
pub fn zone_fault_tolerant(members: &[ObservedMember]) -> bool {
    let voters: Vec<&ObservedMember> = members.iter().filter(|m| !m.is_learner).collect();
    if voters.is_empty() {
        return false;
    }
    let healthy_total = voters.iter().filter(|m| m.healthy).count();
    let worst_zone = healthy_per_zone(&voters).into_values().max().unwrap_or(0);
    healthy_total - worst_zone >= quorum(voters.len())
}

fn healthy_per_zone<'a>(voters: &[&'a ObservedMember]) -> BTreeMap<Option<&'a str>, usize> {
    let mut per_zone = BTreeMap::new();
    for voter in voters {
        *per_zone.entry(voter.zone.as_deref()).or_insert(0) += usize::from(voter.healthy);
    }
    per_zone
}

/// Voter health of an observation, the facts every decision below is made from.
struct Health<'a> {
    members: &'a [ObservedMember],
    voters: usize,
    healthy_voters: usize,
    leader: Option<&'a ObservedMember>,
}

impl<'a> Health<'a> {
    fn of(observed: &'a Observed) -> Option<Self> {
        let members = observed.members.as_deref()?;
        let voters = members.iter().filter(|m| !m.is_learner).count();
        let healthy_voters = members.iter().filter(|m| !m.is_learner && m.healthy).count();
        let leader = observed.leader.and_then(|id| members.iter().find(|m| m.id == id));
        Some(Self { members, voters, healthy_voters, leader })
    }

    fn quorum(&self) -> usize {
        quorum(self.voters)
    }

    /// A leader that is one of the listed members, and a quorum of healthy voters.
    fn has_quorum(&self) -> bool {
        self.voters > 0 && self.leader.is_some() && self.healthy_voters >= self.quorum()
    }

    fn unhealthy(&self) -> Vec<&'a str> {
        self.members.iter().filter(|m| !m.healthy).map(|m| m.name.as_str()).collect()
    }
}

/// Where a cluster stands relative to its spec, before deciding what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Situation {
    InvalidSpec(String),
    /// Volumes of an earlier cluster of this name exist and the spec does not adopt them;
    /// `from_backup`: it makes the cluster from a backup, so it never may.
    KeptVolumes {
        names: Vec<String>,
        from_backup: bool,
    },
    NotCreated,
    /// The membership is being changed towards the spec; this is its next step.
    Changing(Step),
    /// A membership change is under way and cannot take its next step yet.
    ChangeBlocked {
        reason: String,
        not_catching_up: Vec<String>,
    },
    NoMemberAnswers,
    NoQuorum {
        healthy_voters: usize,
        voters: usize,
        leader_known: bool,
    },
    /// The membership the members report does not have the members the workload runs.
    MembershipMismatch {
        listed: usize,
        expected: i32,
    },
    MembersUnhealthy(Vec<String>),
    /// A rolling update onto a changed template; this is its next step.
    Updating(Step),
    /// A rolling update waits for the member restarted last (or another) to catch up.
    UpdateBlocked(String),
    Steady,
}

fn assess(spec: &ConsensusClusterSpec, observed: &Observed) -> Situation {
    let problems = validate_spec(spec);
    if !problems.is_empty() {
        let reasons: Vec<String> = problems.iter().map(ToString::to_string).collect();
        return Situation::InvalidSpec(reasons.join("; "));
    }
    if refuses_kept_volumes(spec, observed) {
        let from_backup = spec.bootstrap.as_ref().is_some_and(|b| b.from_backup.is_some());
        return Situation::KeptVolumes { names: observed.kept_volumes.clone(), from_backup };
    }
    let Some(current) = observed.workload_replicas else {
        return Situation::NotCreated;
    };
    let Some(health) = Health::of(observed) else {
        return Situation::NoMemberAnswers;
    };
    if !health.has_quorum() {
        return Situation::NoQuorum {
            healthy_voters: health.healthy_voters,
            voters: health.voters,
            leader_known: health.leader.is_some(),
        };
    }
    match scaling::next_change(spec.replicas, observed, &health) {
        Some(scaling::Change::Act(step)) => return Situation::Changing(step),
        Some(scaling::Change::Blocked { reason, not_catching_up }) => {
            return Situation::ChangeBlocked { reason, not_catching_up };
        }
        None => {}
    }
    if i32::try_from(health.members.len()).ok() != Some(current) {
        return Situation::MembershipMismatch { listed: health.members.len(), expected: current };
    }
    let unhealthy = health.unhealthy();
    if !unhealthy.is_empty() {
        // A member that is down on an old template is restarted onto the current one first:
        // that costs nothing not lost already, and rolling back a version that crash-loops
        // takes it (nothing else replaces its pod).
        if let Some(down) = health.members.iter().find(|m| !m.healthy && m.outdated == Some(true)) {
            return Situation::Updating(Step::UpdateMember { name: down.name.clone() });
        }
        return Situation::MembersUnhealthy(unhealthy.into_iter().map(str::to_owned).collect());
    }
    next_update(observed, &health).unwrap_or(Situation::Steady)
}

/// Whether volumes an earlier cluster of this name left hold up everything: nothing is
/// created or applied while they exist, unless the spec adopts them. Once a cluster has run
/// under this resource, its volumes are its own.
pub fn refuses_kept_volumes(spec: &ConsensusClusterSpec, observed: &Observed) -> bool {
    !observed.established
        && !observed.kept_volumes.is_empty()
        && spec.storage.existing_volumes == ExistingVolumePolicy::Refuse
}

/// The next step of a rolling update, one member at a time: followers first, the leader
/// last once leadership has moved to an updated follower, and each only while every member
/// is caught up with the leader. A restarted member is healthy as soon as it knows the
/// leader, but it may still be replaying its log: restarting the next one then would leave
/// fewer caught-up members than a quorum needs for a while.
fn next_update(observed: &Observed, health: &Health<'_>) -> Option<Situation> {
    let members = health.members;
    let outdated: Vec<&ObservedMember> = members.iter().filter(|m| m.outdated == Some(true)).collect();
    // Nothing is restarted on a guess: while any member's template is not known, the
    // update waits (the next observation knows).
    if outdated.is_empty() || members.iter().any(|m| m.outdated.is_none()) {
        return None;
    }
    let updated = members.len() - outdated.len();
    let behind: Vec<&str> = members
        .iter()
        .filter(|m| log_caught_up(m, observed.leader_raft_index) != Some(true))
        .map(|m| m.name.as_str())
        .collect();
    if !behind.is_empty() {
        return Some(Situation::UpdateBlocked(format!(
            "{updated} of {} members run the new template; waiting for {} to catch up with the leader \
             before restarting the next",
            members.len(),
            behind.join(", ")
        )));
    }
    let leader = health.leader?;
    let by_ordinal = |m: &&&ObservedMember| scaling::ordinal(&m.name).map(|(_, n)| n);
    if let Some(follower) = outdated.iter().filter(|m| m.id != leader.id).max_by_key(by_ordinal) {
        return Some(Situation::Updating(Step::UpdateMember { name: follower.name.clone() }));
    }
    // Only the leader is left: an updated voter takes over first, so the restart costs an
    // election nobody waits for instead of a leaderless election timeout.
    let successor = members
        .iter()
        .filter(|m| !m.is_learner && m.id != leader.id && m.healthy && m.outdated == Some(false))
        .max_by_key(|m| (m.applied_index, std::cmp::Reverse(m.name.as_str())));
    Some(Situation::Updating(match successor {
        Some(to) => Step::TransferLeadership { to: to.id },
        // A single member has nobody to hand over to: it is unavailable while it restarts.
        None => Step::UpdateMember { name: leader.name.clone() },
    }))
}

impl Situation {
    /// Why we wait, in words an operator of the cluster can act on.
    fn wait_reason(&self) -> String {
        match self {
            Situation::ChangeBlocked { reason, .. } => reason.clone(),
            Situation::NoMemberAnswers => "no member answers on the etcd API yet".to_owned(),
            Situation::NoQuorum { healthy_voters, voters, leader_known } => {
                let leader = if *leader_known { "a leader is known" } else { "no leader is known" };
                format!(
                    "{healthy_voters} of {voters} voters are healthy and {leader}; a quorum needs {} \
                     healthy voters and a leader",
                    quorum(*voters)
                )
            }
            Situation::MembershipMismatch { listed, expected } => {
                format!("the members list {listed} members but {expected} run; waiting for them to agree")
            }
            Situation::MembersUnhealthy(names) => {
                format!("waiting for {} to become healthy again", names.join(", "))
            }
            Situation::InvalidSpec(reason) | Situation::UpdateBlocked(reason) => reason.clone(),
            Situation::KeptVolumes { names, from_backup } => format!(
                "volumes of an earlier cluster named like this one exist ({}); they hold its data and \
                 cluster id, so nothing is created. Delete them (kubectl delete pvc {}){}",
                names.join(", "),
                names.join(" "),
                if *from_backup {
                    ": a cluster made from a backup never starts on them"
                } else {
                    ", or set spec.storage.existingVolumes to Adopt to resume that cluster on them"
                }
            ),
            Situation::NotCreated | Situation::Steady | Situation::Changing(_) | Situation::Updating(_) => {
                String::new()
            }
        }
    }
}

/// The single next step for `spec` given what was `observed`: the membership's, with
/// scheduled backups folded in (`backup::with_backups`).
pub fn plan(spec: &ConsensusClusterSpec, observed: &Observed) -> Step {
    let situation = assess(spec, observed);
    // Decided from this observation, not only from what status said: members that came back
    // after the timeout end the loss, and nothing is recovered.
    let lost_now = matches!(situation, Situation::NoQuorum { .. } | Situation::NoMemberAnswers);
    if !matches!(situation, Situation::InvalidSpec(_))
        && let Some(step) = recovery::step(spec, observed, lost_now)
    {
        return step;
    }
    // Nothing changes the membership: a backup may start, also while a member is down (a
    // degraded cluster is when a backup is worth most).
    let quiet = matches!(situation, Situation::Steady | Situation::MembersUnhealthy(_));
    backup::with_backups(spec, observed, membership_step(spec, observed, situation), quiet)
}

fn membership_step(spec: &ConsensusClusterSpec, observed: &Observed, situation: Situation) -> Step {
    match situation {
        Situation::InvalidSpec(reason) => Step::RefuseSpec { reason },
        // Without members: the first is restored from the backup before it starts.
        Situation::NotCreated if recovery::from_backup_pending(spec, observed) => {
            Step::CreateWorkload { replicas: 0, bootstrap: false }
        }
        Situation::NotCreated => Step::CreateWorkload {
            replicas: spec.replicas,
            // Adopted volumes hold a cluster's data: their members resume it, and a member
            // without one joins them rather than founding a second cluster.
            bootstrap: !observed.established && observed.kept_volumes.is_empty(),
        },
        Situation::Steady => Step::Steady,
        Situation::Changing(step) | Situation::Updating(step) => step,
        waiting => Step::Wait { reason: waiting.wait_reason() },
    }
}

/// Whether the cluster has ever had a quorum of healthy voters under a leader, judged from
/// the status written before (each of these phases is decided only with one): a cluster
/// without quorum is bootstrapping the first time and has lost quorum after that.
fn was_established(previous: Option<&ConsensusClusterStatus>) -> bool {
    previous.is_some_and(|p| {
        // Lost, so it had one (a cluster made from a backup is Restoring while it grows).
        recovery::quorum_lost_since(Some(p)).is_some()
            || matches!(
                p.phase,
                Some(
                    Phase::Running
                        | Phase::Degraded
                        | Phase::Scaling
                        | Phase::Updating
                        | Phase::QuorumLost
                )
            )
            // A recovery replaces a cluster that ran; a bootstrap from a backup, none.
            || (p.phase == Some(Phase::Restoring) && p.recovery.as_ref().is_none_or(|r| r.quorum_lost.is_some()))
    })
}

struct NewCondition {
    type_: &'static str,
    status: bool,
    reason: &'static str,
    message: String,
}

fn condition(
    type_: &'static str,
    status: bool,
    reason: &'static str,
    message: impl Into<String>,
) -> NewCondition {
    NewCondition { type_, status, reason, message: message.into() }
}

/// The status for this reconcile: phase, members, leader, backups and conditions, keeping
/// each condition's `lastTransitionTime` from `previous` while its status is unchanged, and
/// the fields other parts of the operator own (the selector) as they were. `failure` is why
/// carrying out `step` failed, when it did.
pub fn status(
    spec: &ConsensusClusterSpec,
    observed: &Observed,
    step: &Step,
    failure: Option<&str>,
    previous: Option<&ConsensusClusterStatus>,
    now: Time,
) -> ConsensusClusterStatus {
    let situation = assess(spec, observed);
    let backups = backup::backup_status(spec, observed, step, failure, previous);
    // A backup started is reported by BackupSucceeded; the membership is where it was.
    let (step, failure) = match step {
        Step::TakeBackup { .. } => (&membership_step(spec, observed, situation.clone()), None),
        step => (step, failure),
    };
    let stuck = learners_stuck(&situation, previous, &now);
    let health = Health::of(observed);
    let has_quorum = health.as_ref().is_some_and(Health::has_quorum);
    // A quorum is lost only once it was had: a leader elected while the other members are
    // not ready yet (their pods starting) is still the cluster bootstrapping.
    let established = has_quorum || was_established(previous);
    let quorum_lost = observed.workload_replicas.is_some() && established && !has_quorum;

    let recovering = matches!(step, Step::BeginRecovery { .. } | Step::Recover { .. })
        || (observed.recovery.is_some() && !recovery::finished(spec, observed));
    let phase = if observed.workload_replicas.is_none() {
        Phase::Pending
    } else if recovering {
        Phase::Restoring
    } else if quorum_lost {
        Phase::QuorumLost
    } else if health.is_none() {
        Phase::Pending
    } else if !has_quorum {
        Phase::Bootstrapping
    } else if matches!(step, Step::Steady) && observed.refused_changes.is_empty() {
        Phase::Running
    } else if matches!(situation, Situation::Changing(_) | Situation::ChangeBlocked { .. }) {
        Phase::Scaling
    } else if matches!(situation, Situation::Updating(_) | Situation::UpdateBlocked(_)) {
        Phase::Updating
    } else {
        Phase::Degraded
    };

    let mut members: Vec<MemberStatus> = observed
        .members
        .iter()
        .flatten()
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
            caught_up: log_caught_up(m, observed.leader_raft_index),
        })
        .collect();
    // Sorted, so an unchanged cluster writes an unchanged status.
    members.sort_by(|a, b| a.name.cmp(&b.name));

    let mut conditions = vec![
        available(health.as_ref(), observed),
        progressing(&situation, step, failure, stuck),
        degraded(&situation, observed, step, quorum_lost, stuck),
        quorum_lost_condition(spec, observed, &situation, quorum_lost, established),
        zone_condition(observed),
    ];
    // BackupSucceeded is dropped with spec.backup, and kept as it was while a backup is
    // being taken.
    let keeps_backup_condition = spec.backup.is_some() && backups.condition.is_none();
    conditions.extend(backups.condition);
    let mut conditions: Vec<Condition> =
        conditions.into_iter().map(|c| to_condition(c, observed.generation, previous, &now)).collect();
    // Conditions this planner does not decide stay as their owners wrote them.
    if let Some(previous) = previous {
        let ours = [
            condition::AVAILABLE,
            condition::PROGRESSING,
            condition::DEGRADED,
            condition::QUORUM_LOST,
            condition::ZONE_FAULT_TOLERANT,
        ];
        let kept = |c: &&Condition| {
            !ours.contains(&c.type_.as_str())
                && (c.type_ != condition::BACKUP_SUCCEEDED || keeps_backup_condition)
        };
        conditions.extend(previous.conditions.iter().filter(kept).cloned());
    }

    ConsensusClusterStatus {
        observed_generation: observed.generation,
        phase: Some(phase),
        replicas: observed.workload_replicas.unwrap_or(0),
        ready_replicas: members.iter().filter(|m| m.healthy).count().try_into().unwrap_or(i32::MAX),
        selector: previous.and_then(|p| p.selector.clone()),
        leader: health.as_ref().and_then(|h| h.leader).map(|m| m.name.clone()),
        members,
        cluster_id: observed
            .cluster_id
            .map(|id| format!("{id:x}"))
            .or_else(|| previous.and_then(|p| p.cluster_id.clone())),
        version: running_version(spec, observed).or_else(|| previous.and_then(|p| p.version.clone())),
        conditions,
        last_backup: backups.last_backup,
        next_backup: backups.next_backup,
        last_scheduled_backup: backups.last_scheduled,
        recovery: match step {
            Step::BeginRecovery { record } if failure.is_none() => Some((**record).clone()),
            _ if recovery::finished(spec, observed) || recovery::abandoned_now(observed) => None,
            _ => observed.recovery.clone(),
        },
        last_recovery: match &observed.recovery {
            Some(record) if recovery::finished(spec, observed) => {
                Some(RecoveryRecord { finished: Some(now.clone()), ..record.clone() })
            }
            _ => previous.and_then(|p| p.last_recovery.clone()),
        },
    }
}

/// `spec.version`, once every member is known to run the template that carries it.
fn running_version(spec: &ConsensusClusterSpec, observed: &Observed) -> Option<String> {
    let members = observed.members.as_deref().filter(|m| !m.is_empty())?;
    members.iter().all(|m| m.outdated == Some(false)).then(|| spec.version.clone())?
}

fn to_condition(
    new: NewCondition,
    generation: Option<i64>,
    previous: Option<&ConsensusClusterStatus>,
    now: &Time,
) -> Condition {
    let status = if new.status { "True" } else { "False" };
    let last_transition_time = previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == new.type_))
        .filter(|c| c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: new.type_.to_owned(),
        status: status.to_owned(),
        reason: new.reason.to_owned(),
        message: new.message,
        observed_generation: generation,
        last_transition_time,
    }
}

fn available(health: Option<&Health<'_>>, observed: &Observed) -> NewCondition {
    let summary = |h: &Health<'_>| {
        format!("{} of {} voters healthy, a quorum needs {}", h.healthy_voters, h.voters, h.quorum())
    };
    match health {
        _ if observed.workload_replicas.is_none() => {
            condition(condition::AVAILABLE, false, "NotCreated", "no member has been created yet")
        }
        None => condition(
            condition::AVAILABLE,
            false,
            "NoMemberAnswers",
            Situation::NoMemberAnswers.wait_reason(),
        ),
        Some(h) if h.has_quorum() => {
            let leader = h.leader.map_or("", |m| m.name.as_str());
            condition(condition::AVAILABLE, true, "QuorumHealthy", format!("leader {leader}; {}", summary(h)))
        }
        Some(h) if h.leader.is_none() => condition(condition::AVAILABLE, false, "NoLeader", summary(h)),
        Some(h) => condition(condition::AVAILABLE, false, "NotEnoughHealthyVoters", summary(h)),
    }
}

/// A new member gets this long, from the start of the change, to answer at all: a process
/// starts in about a second even in a debug build, and catching up does not count against
/// it (a member that answers is not stuck, however far behind).
pub const LEARNER_START_GRACE_SECONDS: i64 = 30;

/// Whether new learners that do not answer have had their grace and the change is stuck:
/// it was reported stuck before, or has been progressing for longer than the grace.
fn learners_stuck(situation: &Situation, previous: Option<&ConsensusClusterStatus>, now: &Time) -> bool {
    let Situation::ChangeBlocked { not_catching_up, .. } = situation else { return false };
    if not_catching_up.is_empty() {
        return false;
    }
    let progressing = previous.and_then(|p| p.conditions.iter().find(|c| c.type_ == condition::PROGRESSING));
    progressing.is_some_and(|c| {
        (c.status == "False" && c.reason == "MemberNotCatchingUp")
            || (c.status == "True"
                && now.0.as_second() - c.last_transition_time.0.as_second() >= LEARNER_START_GRACE_SECONDS)
    })
}

fn progressing(situation: &Situation, step: &Step, failure: Option<&str>, stuck: bool) -> NewCondition {
    const TYPE: &str = condition::PROGRESSING;
    if let Some(failure) = failure {
        // Not progressing until a retry succeeds; the message is what a person fixes.
        let message = format!("{} failed and is retried: {failure}", step.name());
        return condition(TYPE, false, "StepFailed", message);
    }
    match (step, situation) {
        (Step::RefuseSpec { reason }, _) => condition(
            TYPE,
            false,
            "InvalidSpec",
            format!("the spec is refused and nothing is changed: {reason}"),
        ),
        (Step::CreateWorkload { replicas, bootstrap: true }, _) => {
            condition(TYPE, true, "Creating", format!("creating {replicas} members that bootstrap together"))
        }
        (Step::CreateWorkload { replicas: 0, .. }, _) => condition(
            TYPE,
            true,
            "Creating",
            "creating the workload without members: the first is restored from the backup before it starts",
        ),
        (Step::CreateWorkload { replicas, bootstrap: false }, _) => condition(
            TYPE,
            true,
            "Recreating",
            format!("creating {replicas} members that rejoin the cluster from their volumes"),
        ),
        (Step::Wait { reason }, Situation::KeptVolumes { .. }) => {
            condition(TYPE, false, "KeptVolumes", reason.clone())
        }
        (Step::Wait { reason }, Situation::UpdateBlocked(_)) => {
            condition(TYPE, true, "WaitingForCatchUp", reason.clone())
        }
        // The change is ready but a backup is being taken (`backup::with_backups`).
        (Step::Wait { reason }, Situation::Changing(_) | Situation::Updating(_)) => {
            condition(TYPE, true, "WaitingForBackup", reason.clone())
        }
        (Step::Wait { reason }, Situation::ChangeBlocked { .. }) => {
            // A new member that has not answered within its grace will not start answering
            // by itself; claiming progress would hide that only scaling back moves on.
            if stuck {
                condition(TYPE, false, "MemberNotCatchingUp", reason.clone())
            } else {
                condition(TYPE, true, "WaitingForLearners", reason.clone())
            }
        }
        (
            Step::AddLearner { .. }
            | Step::ResizeWorkload { .. }
            | Step::ChangeVoters { .. }
            | Step::TransferLeadership { .. }
            | Step::RemoveMember { .. }
            | Step::DeleteVolume { .. }
            | Step::UpdateMember { .. },
            _,
        ) => condition(TYPE, true, step.name(), describe(step)),
        (Step::BeginRecovery { record } | Step::Recover { record }, _) => {
            condition(TYPE, true, "Recovering", recovery::describe(record))
        }
        (Step::Wait { reason }, _) => condition(TYPE, true, "WaitingForMembers", reason.clone()),
        (Step::Steady | Step::TakeBackup { .. }, _) => {
            condition(TYPE, false, "Reconciled", "the cluster is in its declared shape")
        }
    }
}

/// What a membership step does, for the Progressing message.
fn describe(step: &Step) -> String {
    let ids = |ids: &[u64]| ids.iter().map(|id| format!("{id:x}")).collect::<Vec<_>>().join(",");
    match step {
        Step::AddLearner { name } => format!("adding {name} as a learner"),
        Step::ResizeWorkload { replicas } => format!("resizing the workload to {replicas} members"),
        Step::ChangeVoters { voters } => {
            format!("changing the voters to {} members ({}) in one step", voters.len(), ids(voters))
        }
        Step::TransferLeadership { to } => {
            format!("moving leadership to {to:x} before the leader leaves or restarts")
        }
        Step::RemoveMember { id, name } => format!("removing member {name} ({id:x})"),
        Step::DeleteVolume { name } => format!("deleting the volume of {name}"),
        Step::UpdateMember { name } => format!("restarting {name} onto the new template"),
        other => other.name().to_owned(),
    }
}

fn degraded(
    situation: &Situation,
    observed: &Observed,
    step: &Step,
    quorum_lost: bool,
    stuck: bool,
) -> NewCondition {
    const TYPE: &str = condition::DEGRADED;
    // The step, not only the spec, decides: a platform refuses what it cannot even parse.
    if let Step::RefuseSpec { reason } = step {
        return condition(
            TYPE,
            true,
            "InvalidSpec",
            format!("the spec is refused and the cluster keeps running as it is: {reason}"),
        );
    }
    match situation {
        Situation::InvalidSpec(reason) => condition(
            TYPE,
            true,
            "InvalidSpec",
            format!("the spec is refused and the cluster keeps running as it is: {reason}"),
        ),
        _ if quorum_lost => condition(TYPE, true, "QuorumLost", situation.wait_reason()),
        Situation::ChangeBlocked { reason, .. } if stuck => condition(
            TYPE,
            true,
            "MemberNotCatchingUp",
            format!("{reason}; set spec.replicas back to cancel the change"),
        ),
        Situation::MembersUnhealthy(names) => {
            condition(TYPE, true, "MembersUnhealthy", format!("not healthy: {}", names.join(", ")))
        }
        Situation::MembershipMismatch { .. } => {
            condition(TYPE, true, "MembershipMismatch", situation.wait_reason())
        }
        Situation::KeptVolumes { .. } => condition(TYPE, true, "KeptVolumes", situation.wait_reason()),
        _ if !observed.refused_changes.is_empty() => {
            condition(TYPE, true, "ChangeRefused", observed.refused_changes.join("; "))
        }
        _ => condition(TYPE, false, "AsDeclared", "nothing is wrong that the operator can see"),
    }
}

fn quorum_lost_condition(
    spec: &ConsensusClusterSpec,
    observed: &Observed,
    situation: &Situation,
    quorum_lost: bool,
    established: bool,
) -> NewCondition {
    const TYPE: &str = condition::QUORUM_LOST;
    if quorum_lost {
        let message = match situation {
            Situation::NoQuorum { .. } | Situation::NoMemberAnswers => situation.wait_reason(),
            _ => "fewer than a quorum of voters are healthy".to_owned(),
        };
        let recovery = match &observed.recovery {
            Some(record) => format!("recovering from {} ({:?})", record.from, record.source),
            None => recovery::not_recovering(spec, observed),
        };
        condition(TYPE, true, "NotEnoughHealthyVoters", format!("{message}; {recovery}"))
    } else {
        if established {
            condition(TYPE, false, "QuorumHealthy", "a leader and a quorum of healthy voters")
        } else {
            condition(TYPE, false, "Bootstrapping", "the cluster has not had a leader yet")
        }
    }
}

fn zone_condition(observed: &Observed) -> NewCondition {
    const TYPE: &str = condition::ZONE_FAULT_TOLERANT;
    let Some(members) = observed.members.as_deref() else {
        return condition(
            TYPE,
            false,
            "NoMemberAnswers",
            "no member answered, so no zone is known to be safe",
        );
    };
    let voters: Vec<&ObservedMember> = members.iter().filter(|m| !m.is_learner).collect();
    let per_zone = healthy_per_zone(&voters);
    let zone_name =
        |zone: Option<&str>| zone.map_or_else(|| "(members without a zone)".to_owned(), str::to_owned);
    if zone_fault_tolerant(members) {
        let zones: Vec<String> = per_zone.keys().map(|z| zone_name(*z)).collect();
        return condition(
            TYPE,
            true,
            "SurvivesAnyZoneLoss",
            format!("losing any one of {} leaves a quorum of healthy voters", zones.join(", ")),
        );
    }
    let healthy_total: usize = per_zone.values().sum();
    match per_zone.iter().max_by_key(|(_, healthy)| **healthy) {
        None => condition(TYPE, false, "NoVoters", "the members list no voter"),
        Some((zone, healthy)) => condition(
            TYPE,
            false,
            "ZoneLossLosesQuorum",
            format!(
                "losing {} would leave {} healthy voters, a quorum needs {}",
                zone_name(*zone),
                healthy_total - healthy,
                quorum(voters.len())
            ),
        ),
    }
}

pub mod backup;
pub mod recovery;
mod scaling;
pub use scaling::{LEARNER_CAUGHT_UP_ENTRIES, caught_up, log_caught_up, ordinal};

#[cfg(test)]
mod tests;
