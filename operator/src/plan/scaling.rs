//! Membership changes: growing, shrinking and replacing members, one step per reconcile.
//!
//! Nothing here remembers anything: each step is derived from the observation alone, so an
//! operator that dies between two steps is replaced by one that observes where things
//! stand and takes the next step. The order is what keeps the cluster safe:
//! - scale up: a learner per new member, then the members themselves, then, once every new
//!   learner has caught up, the whole new voter set in one joint-consensus step;
//! - scale down: leadership off the leaving members, the staying voters in one step, then
//!   the (now learner) leavers removed, the members stopped, their volumes deleted;
//! - a member that lost its data: the same name added again as a learner (a new id at the
//!   same peer URL) while the old voter is still listed, then, once caught up, put in the
//!   old voter's place in one joint-consensus step (3 voters stay 3, never 2), and the old
//!   id, a learner now, removed last. Never bootstrapped afresh.

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
    let voters: Vec<&ObservedMember> = members.iter().filter(|m| !m.is_learner).collect();

    // A member that lost its data goes first, before any change of size.
    if let Some(change) = replace_lost(replicas, observed, leader, &voters, health) {
        return change;
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

/// The next step of replacing a member that lost its data, `None` when none is under way.
///
/// Two members listed under one name are a replacement under way: the old identity and the
/// learner added at the same peer URL. The one that answers is the member that runs there;
/// when neither does, the voter is the old one (the node refuses to run a voter's id on an
/// empty volume, and the new member starts as a learner). The old voter is swapped for the
/// caught-up learner in one step, so the voter count never changes, and the old id, left a
/// learner by that step, is removed last.
fn replace_lost(
    replicas: i32,
    observed: &Observed,
    leader: &ObservedMember,
    voters: &[&ObservedMember],
    health: &Health<'_>,
) -> Option<Option<Change>> {
    let members = health.members;
    for name in members.iter().map(|m| &m.name).filter(|n| wanted(n, replicas)) {
        let listed: Vec<&ObservedMember> = members.iter().filter(|m| &m.name == name).collect();
        let [a, b] = listed[..] else { continue };
        let (voter, learner) = match (a.is_learner, b.is_learner) {
            (false, true) => (a, b),
            (true, false) => (b, a),
            _ if a.healthy != b.healthy => {
                let stale = if a.healthy { b } else { a };
                return Some(remove_stale(stale, leader));
            }
            _ => {
                return Some(blocked(format!(
                    "{name} is listed twice ({:x}, {:x}) and neither answers; waiting for the one that runs there",
                    a.id, b.id
                )));
            }
        };
        if voter.healthy {
            return Some(remove_stale(learner, leader));
        }
        return Some(swap(voter, learner, observed, voters));
    }
    let broken =
        members.iter().find(|m| observed.lost_data.contains(&m.name) && wanted(&m.name, replicas))?;
    if broken.is_learner {
        // A learner holds no vote: its old id simply goes, and the name is added again.
        return Some(Some(Change::Act(Step::RemoveMember { id: broken.id, name: broken.name.clone() })));
    }
    if broken.id == leader.id {
        // It answers as leader, so it is not as lost as reported: move leadership first.
        let others = voters.iter().filter(|m| m.healthy && m.id != broken.id);
        return Some(match others.min_by_key(|m| (std::cmp::Reverse(m.applied_index), m.name.as_str())) {
            Some(to) => Some(Change::Act(Step::TransferLeadership { to: to.id })),
            None => blocked(format!("{} lost its data but no other voter is healthy", broken.name)),
        });
    }
    // The new identity joins while the old voter is still listed: removing the old one
    // first would leave an even number of voters until the new one caught up.
    Some(Some(Change::Act(Step::AddLearner { name: broken.name.clone() })))
}

/// The learner that replaces `old` takes its vote in one joint-consensus step, once it
/// has caught up and the new voter set has a healthy quorum.
fn swap(
    old: &ObservedMember,
    new: &ObservedMember,
    observed: &Observed,
    voters: &[&ObservedMember],
) -> Option<Change> {
    if !caught_up(new, observed.leader_raft_index) {
        let state = match new.applied_index {
            Some(applied) if new.healthy => format!("has applied {applied}"),
            _ => "does not answer yet".to_owned(),
        };
        return Some(Change::Blocked {
            reason: format!(
                "{} ({:x}) replaces {:x}, which lost its data, and {state}; it takes the old vote once \
                 caught up, so the {} voters stay {} throughout",
                new.name,
                new.id,
                old.id,
                voters.len(),
                voters.len()
            ),
            not_catching_up: if new.healthy { Vec::new() } else { vec![new.name.clone()] },
        });
    }
    let staying: Vec<&ObservedMember> =
        voters.iter().copied().filter(|m| m.id != old.id).chain(std::iter::once(new)).collect();
    let healthy = staying.iter().filter(|m| m.healthy).count();
    if healthy < quorum(staying.len()) {
        return blocked(format!(
            "{} would replace {:x} as a voter, but only {healthy} of the {} voters after it would be healthy",
            new.name,
            old.id,
            staying.len()
        ));
    }
    Some(Change::Act(Step::ChangeVoters { voters: sorted_ids(&staying) }))
}

/// The old identity of a replaced member, a learner: it holds no vote and goes.
fn remove_stale(stale: &ObservedMember, leader: &ObservedMember) -> Option<Change> {
    if stale.is_learner && stale.id != leader.id {
        return Some(Change::Act(Step::RemoveMember { id: stale.id, name: stale.name.clone() }));
    }
    blocked(format!(
        "{} is listed twice and {:x}, the identity that does not answer, is a voter; waiting for it to be \
         replaced by the one that runs",
        stale.name, stale.id
    ))
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
#[path = "scaling_tests.rs"]
mod tests;
