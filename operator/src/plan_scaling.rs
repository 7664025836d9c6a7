//! Membership changes: growing, shrinking and replacing members, one step per reconcile.
//!
//! Nothing here remembers anything: each step is derived from the observation alone, so an
//! operator that dies between two steps is replaced by one that observes where things
//! stand and takes the next step. The order is what keeps the cluster safe:
//! - scale up: a learner per new member, then the members themselves, then, once every new
//!   learner has caught up, the whole new voter set in one joint-consensus step;
//! - scale down: leadership off the leaving members, the staying voters in one step, then
//!   the (now learner) leavers removed, the members stopped, their volumes deleted;
//! - a member that lost its data: its old id removed, the same name added again as a
//!   learner (a new id), promoted like any new learner. Never bootstrapped afresh.

use std::collections::BTreeSet;

use super::{Health, Observed, ObservedMember, Step, quorum};

/// A learner counts as caught up when its applied index is within this many entries of the
/// leader's raft index. The node refuses to promote a learner more than 1000 entries behind
/// (`LEARNER_CATCH_UP_ENTRIES` in node/src/member.rs); 100 leaves room for the entries a
/// write load adds between this observation and the ChangeVoters call (a reconcile is about
/// a second; the tests' load is a few hundred writes a second), while a learner still
/// receiving a snapshot or replaying its log is thousands behind and is not mistaken.
pub const LEARNER_CAUGHT_UP_ENTRIES: u64 = 100;

/// What the membership needs next, when it needs anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Change {
    Act(Step),
    /// A change is under way but cannot take its next step yet.
    Blocked {
        reason: String,
        /// New learners that do not answer (never started or crashing): the change cannot
        /// finish while they do not, and only scaling back cancels it.
        not_catching_up: Vec<String>,
    },
}

/// `<cluster>-<ordinal>` split; `None` for a name the operator did not give.
pub fn ordinal(name: &str) -> Option<(&str, u32)> {
    let (prefix, number) = name.rsplit_once('-')?;
    if prefix.is_empty() || number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((prefix, number.parse().ok()?))
}

/// Whether member `name` belongs to a cluster of `replicas` members.
fn wanted(name: &str, replicas: i32) -> bool {
    ordinal(name).is_some_and(|(_, n)| i64::from(n) < i64::from(replicas))
}

/// Whether a learner is healthy and its log close enough to the leader's to be promoted.
pub fn caught_up(member: &ObservedMember, leader_raft_index: Option<u64>) -> bool {
    member.healthy && log_caught_up(member, leader_raft_index) == Some(true)
}

/// Whether a member has applied the leader's log up to `LEARNER_CAUGHT_UP_ENTRIES`;
/// `None` when either index is unknown. Status reports it for every member, by the same
/// margin the promotion of learners uses.
pub fn log_caught_up(member: &ObservedMember, leader_raft_index: Option<u64>) -> Option<bool> {
    Some(member.applied_index?.saturating_add(LEARNER_CAUGHT_UP_ENTRIES) >= leader_raft_index?)
}

fn blocked(reason: String) -> Option<Change> {
    Some(Change::Blocked { reason, not_catching_up: Vec::new() })
}

/// The next membership change towards `replicas` members, `None` when the membership is
/// as declared. Called only with a leader and a quorum of healthy voters.
pub(super) fn next_change(replicas: i32, observed: &Observed, health: &Health<'_>) -> Option<Change> {
    let change = plan_change(replicas, observed, health)?;
    // Joint consensus cannot leave out the member that runs it; the node refuses too, but
    // the planner should never ask.
    if let (Change::Act(Step::ChangeVoters { voters }), Some(leader)) = (&change, observed.leader)
        && !voters.contains(&leader)
    {
        return blocked(format!(
            "the leader {leader:x} would not be a voter; waiting for leadership to settle on a member that stays"
        ));
    }
    Some(change)
}

fn plan_change(replicas: i32, observed: &Observed, health: &Health<'_>) -> Option<Change> {
    let members = health.members;
    let workload = observed.workload_replicas?;
    let leader = health.leader?;
    if let Some(stranger) = members.iter().find(|m| ordinal(&m.name).is_none()) {
        return blocked(format!(
            "member {:x} ({:?}) has no name of the form <cluster>-<ordinal>; the operator changes no \
             membership it cannot account for",
            stranger.id, stranger.name
        ));
    }
    if leader.is_learner {
        // Answers gathered from different members at different moments can disagree; a
        // learner cannot lead, so this view is stale and no change is planned from it.
        return blocked(format!("{} is reported both as leader and as a learner", leader.name));
    }
    let lost = |m: &ObservedMember| observed.lost_data.contains(&m.name);
    let voters: Vec<&ObservedMember> = members.iter().filter(|m| !m.is_learner).collect();

    // A member that lost its data goes first: its old identity must leave before the same
    // name joins again as a new member.
    if let Some(broken) = members.iter().find(|m| lost(m) && wanted(&m.name, replicas)) {
        return remove_lost(broken, leader, &voters, health);
    }

    // Scale down: everything listed beyond the declared size (or lost and not wanted) leaves.
    let leaving = |m: &ObservedMember| !wanted(&m.name, replicas);
    let missing = missing_member(replicas, members);
    if voters.iter().any(|m| leaving(m)) {
        // The voters that stay: the wanted voters, and wanted learners ready to be promoted
        // in the same step (a replacement that was under way when the shrink was asked for).
        let staying: Vec<&ObservedMember> = members
            .iter()
            .filter(|m| !leaving(m) && (!m.is_learner || caught_up(m, observed.leader_raft_index)))
            .collect();
        if staying.len().is_multiple_of(2) {
            if let Some(name) = missing {
                return Some(Change::Act(Step::AddLearner { name }));
            }
            return blocked(format!(
                "{} voters would stay; the voter count must stay odd, so the shrink waits for the \
                 members that are joining",
                staying.len()
            ));
        }
        if leaving(leader) {
            let to = staying
                .iter()
                .filter(|m| m.healthy && !m.is_learner)
                .min_by_key(|m| (std::cmp::Reverse(m.applied_index), m.name.as_str()));
            return match to {
                Some(to) => Some(Change::Act(Step::TransferLeadership { to: to.id })),
                None => blocked("no staying voter is healthy to take over leadership".to_owned()),
            };
        }
        let healthy = staying.iter().filter(|m| m.healthy).count();
        if healthy < quorum(staying.len()) {
            return blocked(format!(
                "only {healthy} of the {} staying voters are healthy; shrinking now would lose quorum",
                staying.len()
            ));
        }
        return Some(Change::Act(Step::ChangeVoters { voters: sorted_ids(&staying) }));
    }
    if let Some(learner) = members.iter().find(|m| leaving(m)) {
        return Some(Change::Act(Step::RemoveMember { id: learner.id, name: learner.name.clone() }));
    }
    if workload > replicas {
        return Some(Change::Act(Step::ResizeWorkload { replicas }));
    }
    let prefix = members.iter().find_map(|m| ordinal(&m.name)).map(|(p, _)| p);
    if let Some(volume) = observed.volumes.iter().find(|v| {
        let listed = members.iter().any(|m| &m.name == *v);
        let beyond_workload = ordinal(v)
            .is_some_and(|(p, n)| Some(p) == prefix && i64::from(n) >= i64::from(workload.min(replicas)));
        // A volume of a member that is gone: left by a shrink, or a stale one that would
        // otherwise bring an old identity back into a new member.
        !listed && beyond_workload
    }) {
        return Some(Change::Act(Step::DeleteVolume { name: volume.clone() }));
    }

    // Scale up (and re-adding a replaced member): a learner for each missing member first.
    if let Some(name) = missing {
        return Some(Change::Act(Step::AddLearner { name }));
    }
    if workload < replicas {
        return Some(Change::Act(Step::ResizeWorkload { replicas }));
    }
    let learners: Vec<&ObservedMember> = members.iter().filter(|m| m.is_learner).collect();
    let behind: Vec<&ObservedMember> =
        learners.iter().copied().filter(|m| !caught_up(m, observed.leader_raft_index)).collect();
    if !behind.is_empty() {
        let not_catching_up: Vec<String> =
            behind.iter().filter(|m| !m.healthy).map(|m| m.name.clone()).collect();
        let describe: Vec<String> = behind
            .iter()
            .map(|m| match (m.healthy, m.applied_index) {
                (false, _) => format!("{} does not answer", m.name),
                (true, Some(applied)) => format!(
                    "{} has applied {applied} of {}",
                    m.name,
                    observed.leader_raft_index.map_or_else(|| "?".to_owned(), |i| i.to_string())
                ),
                (true, None) => format!("{} reports no applied index", m.name),
            })
            .collect();
        return Some(Change::Blocked {
            reason: format!(
                "waiting for new learners to catch up before changing the voters ({}); the voter set \
                 stays at {} until then",
                describe.join(", "),
                voters.len()
            ),
            not_catching_up,
        });
    }
    if !learners.is_empty() {
        let all: Vec<&ObservedMember> = members.iter().collect();
        let healthy = all.iter().filter(|m| m.healthy).count();
        if all.len().is_multiple_of(2) {
            return blocked(format!("{} members would be voters; the voter count must stay odd", all.len()));
        }
        if healthy < quorum(all.len()) || health.healthy_voters < health.quorum() {
            return blocked("too few healthy members to change the voters safely".to_owned());
        }
        return Some(Change::Act(Step::ChangeVoters { voters: sorted_ids(&all) }));
    }
    None
}

/// Removes the old identity of a member that lost its data, once that cannot cost quorum.
fn remove_lost(
    broken: &ObservedMember,
    leader: &ObservedMember,
    voters: &[&ObservedMember],
    health: &Health<'_>,
) -> Option<Change> {
    if broken.is_learner {
        return Some(Change::Act(Step::RemoveMember { id: broken.id, name: broken.name.clone() }));
    }
    if broken.id == leader.id {
        // It answers as leader, so it is not as lost as reported: move leadership first.
        let others = voters.iter().filter(|m| m.healthy && m.id != broken.id);
        return match others.min_by_key(|m| (std::cmp::Reverse(m.applied_index), m.name.as_str())) {
            Some(to) => Some(Change::Act(Step::TransferLeadership { to: to.id })),
            None => blocked(format!("{} lost its data but no other voter is healthy", broken.name)),
        };
    }
    let remaining = voters.len() - 1;
    let healthy_remaining = health.healthy_voters - usize::from(broken.healthy);
    if remaining == 0 || healthy_remaining < quorum(remaining) {
        return blocked(format!(
            "{} lost its data, but removing it would leave {healthy_remaining} healthy of {remaining} \
             voters, short of a quorum",
            broken.name
        ));
    }
    Some(Change::Act(Step::RemoveMember { id: broken.id, name: broken.name.clone() }))
}

/// The first member of a cluster of `replicas` that is not listed, named after the others.
fn missing_member(replicas: i32, members: &[ObservedMember]) -> Option<String> {
    let (prefix, _) = members.iter().find_map(|m| ordinal(&m.name))?;
    (0..u32::try_from(replicas).unwrap_or(0))
        .map(|n| format!("{prefix}-{n}"))
        .find(|name| !members.iter().any(|m| &m.name == name))
}

fn sorted_ids(members: &[&ObservedMember]) -> Vec<u64> {
    members.iter().map(|m| m.id).collect::<BTreeSet<u64>>().into_iter().collect()
}

#[cfg(test)]
#[path = "plan_scaling_tests.rs"]
mod tests;
