//! Observing local members through the etcd API, with `etcd-client`: the same calls an
//! etcd user makes (Status and MemberList on every member), so what the operator sees is
//! what `etcdctl` would show, and the code would work against etcd itself.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use tokio::task::JoinSet;

use super::workload::MemberRecord;
use crate::plan::{Observed, ObservedMember};

/// Loopback answers in microseconds; a member slower than this is unhealthy for our purpose.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// What one member said about itself and the membership.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The name the operator started it under.
    pub started_as: String,
    pub member_id: u64,
    pub cluster_id: u64,
    /// 0 when the member knows no leader, as etcd reports it.
    pub leader: u64,
    pub raft_term: u64,
    pub applied_index: u64,
    pub is_learner: bool,
    pub members: Option<Vec<Listed>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listed {
    pub id: u64,
    pub name: String,
    pub is_learner: bool,
}

/// Asks every member at once.
pub async fn ask_all(members: &[MemberRecord]) -> Vec<Answer> {
    let mut asks = JoinSet::new();
    for member in members {
        let (name, url) = (member.name.clone(), member.client_url());
        asks.spawn(async move { tokio::time::timeout(CALL_TIMEOUT * 3, ask(name, url)).await });
    }
    let mut answers = Vec::new();
    while let Some(result) = asks.join_next().await {
        if let Ok(Ok(Some(answer))) = result {
            answers.push(answer);
        }
    }
    answers.sort_by(|a, b| a.started_as.cmp(&b.started_as));
    answers
}

async fn ask(started_as: String, url: String) -> Option<Answer> {
    let options = ConnectOptions::new().with_connect_timeout(CALL_TIMEOUT).with_timeout(CALL_TIMEOUT);
    let mut client = Client::connect([url.as_str()], Some(options)).await.ok()?;
    let status = client.status().await.inspect_err(|e| tracing::debug!(%url, "Status: {e}")).ok()?;
    let header = status.header()?;
    let members = client.member_list().await.ok().map(|list| {
        list.members()
            .iter()
            .map(|m| Listed { id: m.id(), name: m.name().to_owned(), is_learner: m.is_learner() })
            .collect()
    });
    Some(Answer {
        started_as,
        member_id: header.member_id(),
        cluster_id: header.cluster_id(),
        leader: status.leader(),
        raft_term: status.raft_term(),
        applied_index: status.raft_applied_index(),
        is_learner: status.is_learner(),
        members,
    })
}

/// The planner's view from the members' answers: the leader as the most recent term
/// reports it, the membership as the leader lists it (any member's list without one), and
/// a member healthy when it answered and knows a leader.
pub fn combine(answers: &[Answer], generation: Option<i64>, workload_replicas: Option<i32>) -> Observed {
    let newest = answers.iter().filter(|a| a.leader != 0).max_by_key(|a| a.raft_term);
    let leader = newest.map(|a| a.leader);
    let listing = answers
        .iter()
        .filter(|a| a.members.is_some())
        .max_by_key(|a| (Some(a.member_id) == leader, a.raft_term));
    let listed: Vec<Listed> = match listing.and_then(|a| a.members.clone()) {
        Some(listed) => listed,
        None => answers
            .iter()
            .map(|a| Listed { id: a.member_id, name: a.started_as.clone(), is_learner: a.is_learner })
            .collect(),
    };
    let members = (!answers.is_empty()).then(|| {
        listed
            .into_iter()
            .map(|m| {
                let answer = answers.iter().find(|a| a.member_id == m.id);
                // A member not started yet is listed without a name; the one it was started
                // under is the next best.
                let name = match (m.name.is_empty(), answer) {
                    (false, _) => m.name,
                    (true, Some(a)) => a.started_as.clone(),
                    (true, None) => format!("{:x}", m.id),
                };
                ObservedMember {
                    id: m.id,
                    name,
                    is_learner: m.is_learner,
                    healthy: answer.is_some_and(|a| a.leader != 0),
                    zone: None,
                    applied_index: answer.map(|a| a.applied_index),
                }
            })
            .collect()
    });
    Observed {
        generation,
        workload_replicas,
        members,
        leader,
        cluster_id: newest.or(answers.first()).map(|a| a.cluster_id),
        ..Observed::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(id: u64, leader: u64, term: u64, listed: bool) -> Answer {
        Answer {
            started_as: format!("demo-{id}"),
            member_id: id,
            cluster_id: 7,
            leader,
            raft_term: term,
            applied_index: 5,
            is_learner: false,
            members: listed.then(|| {
                (1..=3).map(|i| Listed { id: i, name: format!("demo-{i}"), is_learner: false }).collect()
            }),
        }
    }

    #[test]
    fn nobody_answering_is_no_observation_of_members() {
        let observed = combine(&[], Some(1), Some(3));
        assert_eq!(observed.members, None);
        assert_eq!(observed.leader, None);
        assert_eq!(observed.workload_replicas, Some(3));
    }

    #[test]
    fn a_silent_member_is_listed_unhealthy_and_the_newest_term_names_the_leader() {
        // Member 1 still believes in the old leader 3 of term 1; members 2 says 2 of term 2.
        let observed = combine(&[answer(1, 3, 1, true), answer(2, 2, 2, true)], Some(1), Some(3));
        assert_eq!(observed.leader, Some(2));
        assert_eq!(observed.cluster_id, Some(7));
        let members = observed.members.expect("members");
        assert_eq!(members.len(), 3);
        assert!(members[0].healthy && members[1].healthy);
        assert!(!members[2].healthy);
        assert_eq!(members[2].applied_index, None);
    }

    #[test]
    fn a_member_without_a_leader_is_unhealthy() {
        let observed = combine(&[answer(1, 0, 1, true)], None, Some(3));
        assert_eq!(observed.leader, None);
        assert!(observed.members.expect("members").iter().all(|m| !m.healthy));
    }
}
