//! The member observer both platforms use: every member is asked on its own URL, the
//! leader is the one named in the newest term, the membership is the leader's MemberList,
//! and each member's health is its own answer. Pure: the answers come in, the view goes
//! out, so the rules are unit tests.
//!
//! Why each rule: a member cut off from the others keeps naming the leader of its last
//! term, so "most reported" can pick a deposed leader when the cut-off ones are many; the
//! newest term cannot. A follower's list can lag the leader's by the last change. A member
//! can only speak for itself: one that does not answer is unhealthy whatever the others say,
//! and members that answer without knowing a leader (bootstrap, quorum loss) are still
//! reported, as unhealthy, because that is when people look at the status.

use crate::plan::ObservedMember;

/// A member to ask, by the name the platform runs it under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    /// Its own client URL: not a Service that picks some member.
    pub client_url: String,
}

/// What one member said about itself, and (for one of them) about the membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The target's name, which the member may not list yet (started, not yet published).
    pub name: String,
    /// The URL it answered on.
    pub client_url: String,
    pub member_id: u64,
    pub cluster_id: u64,
    /// 0 when the member knows no leader, as etcd reports it.
    pub leader: u64,
    pub raft_term: u64,
    /// The member's raft index (etcd's Status `raft_index`); the leader's judges learners.
    pub raft_index: u64,
    pub applied_index: u64,
    pub is_learner: bool,
    /// Its MemberList, when it was the one asked for it.
    pub members: Option<Vec<Listed>>,
}

impl Answer {
    /// It answered as the leader of its term.
    fn leads(&self) -> bool {
        self.leader != 0 && self.leader == self.member_id
    }
}

/// One member as a MemberList names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub id: u64,
    /// Empty for a member added but not started yet, as etcd lists it.
    pub name: String,
    pub is_learner: bool,
    pub peer_urls: Vec<String>,
}

/// The members' answers, as the planner and the platform's act need them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemberView {
    /// `None` when no member answered.
    pub members: Option<Vec<ObservedMember>>,
    pub leader: Option<u64>,
    /// Where the leader answered: leader-only changes go there and nowhere else.
    pub leader_url: Option<String>,
    pub leader_raft_index: Option<u64>,
    pub cluster_id: Option<u64>,
}

/// The leader named in the newest term; a term has at most one leader.
pub fn leader(answers: &[Answer]) -> Option<u64> {
    answers.iter().filter(|a| a.leader != 0).max_by_key(|a| a.raft_term).map(|a| a.leader)
}

/// The answers (by index) to take the MemberList from, best first: the leader answering
/// as itself, then the newest terms.
pub fn listing_order(answers: &[Answer]) -> Vec<usize> {
    let leader = leader(answers);
    let mut order: Vec<usize> = (0..answers.len()).collect();
    order.sort_by_key(|&i| {
        let a = &answers[i];
        std::cmp::Reverse((a.leads() && Some(a.member_id) == leader, a.raft_term))
    });
    order
}

/// The view from the answers. `name_of` names, by its peer URL, a listed member that has
/// no name yet (added, not started): the planner tells members apart by name and must not
/// add it a second time.
pub fn combine(answers: &[Answer], name_of: impl Fn(&str) -> Option<String>) -> MemberView {
    if answers.is_empty() {
        return MemberView::default();
    }
    let leader = leader(answers);
    let leading = answers.iter().find(|a| a.leads() && Some(a.member_id) == leader);
    let listing = listing_order(answers).into_iter().find_map(|i| answers[i].members.as_ref());
    // No list at all: the members that answered are all that is known.
    let listed: Vec<Listed> = listing.cloned().unwrap_or_else(|| {
        answers
            .iter()
            .map(|a| Listed {
                id: a.member_id,
                name: a.name.clone(),
                is_learner: a.is_learner,
                peer_urls: vec![],
            })
            .collect()
    });
    let members = listed
        .into_iter()
        .map(|m| {
            let answer = answers.iter().find(|a| a.member_id == m.id);
            let name = match (m.name.is_empty(), answer) {
                (false, _) => m.name,
                (true, Some(a)) => a.name.clone(),
                (true, None) => m.peer_urls.iter().find_map(|url| name_of(url)).unwrap_or_default(),
            };
            ObservedMember {
                id: m.id,
                name,
                is_learner: m.is_learner,
                healthy: answer.is_some_and(|a| a.leader != 0),
                zone: None,
                applied_index: answer.map(|a| a.applied_index),
                // What a member runs is the platform's to say.
                outdated: None,
            }
        })
        .collect();
    let newest = answers.iter().filter(|a| a.leader != 0).max_by_key(|a| a.raft_term);
    MemberView {
        members: Some(members),
        leader,
        leader_url: leading.map(|a| a.client_url.clone()),
        leader_raft_index: leading.map(|a| a.raft_index),
        cluster_id: newest.or(answers.first()).map(|a| a.cluster_id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(ids: impl IntoIterator<Item = u64>) -> Vec<Listed> {
        ids.into_iter()
            .map(|i| Listed {
                id: i,
                name: format!("demo-{i}"),
                is_learner: false,
                peer_urls: vec![format!("http://demo-{i}.demo-peer.ns.svc:2380")],
            })
            .collect()
    }

    fn answer(id: u64, leader: u64, term: u64, members: Option<Vec<Listed>>) -> Answer {
        Answer {
            name: format!("demo-{id}"),
            client_url: format!("http://demo-{id}.demo-peer.ns.svc:2379"),
            member_id: id,
            cluster_id: 7,
            leader,
            raft_term: term,
            raft_index: 60 + id,
            applied_index: 50 + id,
            is_learner: false,
            members,
        }
    }

    fn no_names(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn nobody_answering_is_no_observation_of_members() {
        assert_eq!(combine(&[], no_names), MemberView::default());
    }

    #[test]
    fn the_newest_term_names_the_leader_even_when_more_members_name_an_older_one() {
        // 3 and 4 are cut off and still believe in 1 of term 4; 2 was elected in term 5.
        let answers = [
            answer(2, 2, 5, Some(listed(1..=5))),
            answer(3, 1, 4, Some(listed(1..=5))),
            answer(4, 1, 4, Some(listed(1..=5))),
        ];
        let view = combine(&answers, no_names);
        assert_eq!(view.leader, Some(2));
        assert_eq!(view.leader_url.as_deref(), Some("http://demo-2.demo-peer.ns.svc:2379"));
        assert_eq!(view.leader_raft_index, Some(62));
        assert_eq!(view.cluster_id, Some(7));
        let health: Vec<(u64, bool)> =
            view.members.expect("members").iter().map(|m| (m.id, m.healthy)).collect();
        assert_eq!(health, [(1, false), (2, true), (3, true), (4, true), (5, false)]);
    }

    #[test]
    fn the_membership_is_the_leaders_list_not_a_lagging_followers() {
        // 3 has not applied the addition of 4 yet.
        let answers = [answer(2, 1, 3, Some(listed(1..=3))), answer(1, 1, 3, Some(listed(1..=4)))];
        let view = combine(&answers, no_names);
        let ids: Vec<u64> = view.members.expect("members").iter().map(|m| m.id).collect();
        assert_eq!(ids, [1, 2, 3, 4]);
        assert_eq!(listing_order(&answers)[0], 1, "the MemberList is asked of the leader first");
    }

    #[test]
    fn members_answering_without_a_leader_are_reported_unhealthy_with_no_leader_address() {
        // Bootstrap or quorum loss: Status answers, nobody leads.
        let answers = [answer(1, 0, 2, None), answer(2, 0, 2, None)];
        let view = combine(&answers, no_names);
        assert_eq!((view.leader, view.leader_url), (None, None));
        let members = view.members.expect("members");
        assert_eq!(members.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["demo-1", "demo-2"]);
        assert!(members.iter().all(|m| !m.healthy));
    }

    #[test]
    fn a_leader_that_does_not_answer_itself_has_no_address() {
        // 2 names 1 as leader, but 1 did not answer us: no member is the place for a change.
        let view = combine(&[answer(2, 1, 3, Some(listed(1..=3)))], no_names);
        assert_eq!(view.leader, Some(1));
        assert_eq!(view.leader_url, None);
        assert_eq!(view.leader_raft_index, None);
    }

    #[test]
    fn an_unstarted_member_is_named_by_its_peer_url() {
        let mut list = listed(1..=4);
        list[3].name.clear();
        let view = combine(&[answer(1, 1, 1, Some(list))], |url| {
            (url == "http://demo-4.demo-peer.ns.svc:2380").then(|| "demo-4".to_owned())
        });
        let members = view.members.expect("members");
        assert_eq!(members[3].name, "demo-4");
        assert!(!members[3].healthy);
    }
}
