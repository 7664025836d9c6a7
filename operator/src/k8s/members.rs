//! Raft membership as the members themselves report it, behind a trait so the reconcile
//! tests can say what the members answer without running any.

use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

/// One member as the cluster reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportedMember {
    pub id: u64,
    pub name: String,
    pub is_learner: bool,
    /// It answered its own Status and knows a leader.
    pub answers: bool,
    pub applied_index: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Membership {
    pub members: Vec<ReportedMember>,
    pub leader: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("no member answered at {endpoint}: {source}")]
    Unreachable {
        endpoint: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

pub trait MemberProbe: Send + Sync + 'static {
    /// The membership as seen through `endpoint` (the cluster's client Service).
    fn membership(&self, endpoint: &str) -> impl Future<Output = Result<Membership, MembershipError>> + Send;
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

    async fn status(&self, urls: &[String]) -> Option<(u64, u64)> {
        if urls.is_empty() {
            return None;
        }
        let mut client = Client::connect(urls, Some(self.options())).await.ok()?;
        let status = client.status().await.ok()?;
        Some((status.leader(), status.raft_applied_index()))
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
        let mut membership = Membership::default();
        let mut seen_leaders = Vec::new();
        for member in list.members() {
            let status = self.status(member.client_urls()).await;
            let leader = status.map(|(leader, _)| leader).filter(|&leader| leader != 0);
            seen_leaders.extend(leader);
            membership.members.push(ReportedMember {
                id: member.id(),
                name: member.name().to_owned(),
                is_learner: member.is_learner(),
                answers: leader.is_some(),
                applied_index: status.map(|(_, applied)| applied),
            });
        }
        membership.leader = most_reported(&seen_leaders);
        Ok(membership)
    }
}

/// The leader most members name: a member cut off from the others may still name an old one.
fn most_reported(leaders: &[u64]) -> Option<u64> {
    let count = |id: u64| leaders.iter().filter(|&&l| l == id).count();
    leaders.iter().copied().max_by_key(|&id| (count(id), id))
}
