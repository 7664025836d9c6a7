//! Raft membership as the members themselves report it, and changes to it, behind traits
//! so the reconcile tests can say what the members answer, and see what they are asked,
//! without running any.

use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

use crate::membership::{self, MemberOps};

/// One member as the cluster reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportedMember {
    pub id: u64,
    pub name: String,
    pub is_learner: bool,
    /// It answered its own Status and knows a leader.
    pub answers: bool,
    pub applied_index: Option<u64>,
    /// The member's own raft index; the leader's is what learners catch up to.
    pub raft_index: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Membership {
    pub members: Vec<ReportedMember>,
    pub leader: Option<u64>,
    /// From the MemberList response header: the Raft cluster these members form.
    pub cluster_id: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("no member answered at {endpoint}: {source}")]
    Unreachable {
        endpoint: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{change} through {endpoint} failed: {source}")]
    Change {
        change: &'static str,
        endpoint: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

pub trait MemberProbe: Send + Sync + 'static {
    /// The membership as seen through `endpoint` (the cluster's client Service).
    fn membership(&self, endpoint: &str) -> impl Future<Output = Result<Membership, MembershipError>> + Send;
}

/// Changes to the Raft membership, each one step the planner chose, sent through
/// `endpoint` (the cluster's client Service).
pub trait MemberChanges: Send + Sync + 'static {
    /// Adds a learner that will be reached at `peer_url`; returns its id.
    fn add_learner(
        &self,
        endpoint: &str,
        peer_url: &str,
    ) -> impl Future<Output = Result<u64, MembershipError>> + Send;
    /// Makes `voters` the voter set in one joint-consensus change.
    fn change_voters(
        &self,
        endpoint: &str,
        voters: &[u64],
    ) -> impl Future<Output = Result<(), MembershipError>> + Send;
    fn move_leader(
        &self,
        endpoint: &str,
        to: u64,
    ) -> impl Future<Output = Result<(), MembershipError>> + Send;
    fn remove(&self, endpoint: &str, id: u64) -> impl Future<Output = Result<(), MembershipError>> + Send;
}

/// The real members, through the shared membership client.
#[derive(Debug, Clone, Default)]
pub struct EtcdChanges;

impl EtcdChanges {
    async fn connect(endpoint: &str, change: &'static str) -> Result<MemberOps, MembershipError> {
        MemberOps::connect(&[endpoint.to_owned()]).await.map_err(|source| MembershipError::Unreachable {
            endpoint: endpoint.to_owned(),
            source: format!("{change}: {source}").into(),
        })
    }
}

fn failed(
    change: &'static str,
    endpoint: &str,
) -> impl FnOnce(membership::MembershipError) -> MembershipError {
    move |source| MembershipError::Change { change, endpoint: endpoint.to_owned(), source: source.into() }
}

impl MemberChanges for EtcdChanges {
    async fn add_learner(&self, endpoint: &str, peer_url: &str) -> Result<u64, MembershipError> {
        const CHANGE: &str = "MemberAdd (learner)";
        let mut ops = Self::connect(endpoint, CHANGE).await?;
        ops.add_learner(peer_url).await.map_err(failed(CHANGE, endpoint))
    }

    async fn change_voters(&self, endpoint: &str, voters: &[u64]) -> Result<(), MembershipError> {
        const CHANGE: &str = "ChangeVoters";
        let mut ops = Self::connect(endpoint, CHANGE).await?;
        ops.change_voters(voters).await.map_err(failed(CHANGE, endpoint))
    }

    async fn move_leader(&self, endpoint: &str, to: u64) -> Result<(), MembershipError> {
        const CHANGE: &str = "MoveLeader";
        let mut ops = Self::connect(endpoint, CHANGE).await?;
        ops.move_leader(to).await.map_err(failed(CHANGE, endpoint))
    }

    async fn remove(&self, endpoint: &str, id: u64) -> Result<(), MembershipError> {
        const CHANGE: &str = "MemberRemove";
        let mut ops = Self::connect(endpoint, CHANGE).await?;
        ops.remove(id).await.map_err(failed(CHANGE, endpoint))
    }
}

/// Asks the members over the etcd v3 API: MemberList through the client Service, then
/// each member's own Status, since only a member can say whether it is healthy.
#[derive(Debug, Clone)]
pub struct EtcdProbe {
    pub timeout: Duration,
}

impl Default for EtcdProbe {
    fn default() -> Self {
        // Short: a reconcile must not hang on a member that is down.
        Self { timeout: Duration::from_secs(2) }
    }
}

impl EtcdProbe {
    fn options(&self) -> ConnectOptions {
        ConnectOptions::new().with_connect_timeout(self.timeout).with_timeout(self.timeout)
    }

    async fn status(&self, urls: &[String]) -> Option<Answer> {
        if urls.is_empty() {
            return None;
        }
        let mut client = Client::connect(urls, Some(self.options())).await.ok()?;
        let status = client.status().await.ok()?;
        Some(Answer {
            leader: status.leader(),
            raft_index: status.raft_index(),
            applied_index: status.raft_applied_index(),
        })
    }
}

impl MemberProbe for EtcdProbe {
    async fn membership(&self, endpoint: &str) -> Result<Membership, MembershipError> {
        let unreachable = |source: etcd_client::Error| MembershipError::Unreachable {
            endpoint: endpoint.to_owned(),
            source: source.into(),
        };
        let mut client = Client::connect([endpoint], Some(self.options())).await.map_err(unreachable)?;
        let list = client.member_list().await.map_err(unreachable)?;
        let mut membership =
            Membership { cluster_id: list.header().map(|h| h.cluster_id()), ..Membership::default() };
        let mut seen_leaders = Vec::new();
        // All at once: a member that is down costs one timeout, not one per member.
        let statuses =
            futures::future::join_all(list.members().iter().map(|member| self.status(member.client_urls())))
                .await;
        for (member, status) in list.members().iter().zip(statuses) {
            let leader = status.map(|s| s.leader).filter(|&leader| leader != 0);
            seen_leaders.extend(leader);
            // A member added but not started yet has no name: only its peer URL says which
            // one it is, and the planner must not add it a second time.
            let name = match member.name() {
                "" => member.peer_urls().iter().find_map(|url| name_from_peer_url(url)).unwrap_or_default(),
                name => name.to_owned(),
            };
            membership.members.push(ReportedMember {
                id: member.id(),
                name,
                is_learner: member.is_learner(),
                answers: leader.is_some(),
                applied_index: status.map(|s| s.applied_index),
                raft_index: status.map(|s| s.raft_index),
            });
        }
        membership.leader = most_reported(&seen_leaders);
        Ok(membership)
    }
}

#[derive(Debug, Clone, Copy)]
struct Answer {
    leader: u64,
    raft_index: u64,
    applied_index: u64,
}

/// `http://demo-3.demo-peer.ns.svc:2380` -> `demo-3`: the first DNS label is the pod's name.
fn name_from_peer_url(url: &str) -> Option<String> {
    let host = url.split_once("://").map_or(url, |(_, rest)| rest);
    let label = host.split(['.', ':', '/']).next()?;
    (!label.is_empty()).then(|| label.to_owned())
}

/// The leader most members name: a member cut off from the others may still name an old one.
fn most_reported(leaders: &[u64]) -> Option<u64> {
    let count = |id: u64| leaders.iter().filter(|&&l| l == id).count();
    leaders.iter().copied().max_by_key(|&id| (count(id), id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unstarted_member_is_named_by_its_peer_url() {
        assert_eq!(name_from_peer_url("http://demo-3.demo-peer.ns.svc:2380").as_deref(), Some("demo-3"));
        assert_eq!(name_from_peer_url("demo-4:2380").as_deref(), Some("demo-4"));
        assert_eq!(name_from_peer_url("http://"), None);
    }
}
