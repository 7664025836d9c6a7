//! Talking to the members, the same way on every platform: each member is asked on its own
//! client URL (on Kubernetes its name under the headless peer Service, locally its
//! loopback port), `observe` turns their answers into the planner's view, and membership
//! changes go to the leader's own URL.
//!
//! [`Members`] is the seam: [`EtcdMembers`] talks to real members over connections it keeps
//! between reconciles; the Kubernetes platform's tests put fake members behind it.

pub mod observe;
mod ops;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

pub use observe::{Answer, Listed, MemberView, Target};
pub use ops::MemberOps;

/// How long one member gets to answer an observation: a member slower than this is
/// unhealthy for our purpose, and one that is down must not stall the reconcile.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("no member answers at {endpoint}: {reason}")]
    Unreachable { endpoint: String, reason: String },
    /// The cluster answered and said no; `message` is its own words (etcd's error text).
    #[error("{operation} refused: {message}")]
    Refused { operation: &'static str, message: String },
    /// The members report no leader, or the leader did not answer on its own URL: a
    /// leader-only change has nowhere to go, and any other member would be the wrong place.
    #[error("no leader answers on its own address, so the change waits")]
    NoLeader,
    #[error("{0:?} is not a usable endpoint")]
    BadEndpoint(String),
}

impl MembershipError {
    /// A call that reached a member and was answered with an error is a refusal; anything
    /// else (connection refused, timed out) means nobody answered.
    fn from_etcd(operation: &'static str, endpoint: &str, err: etcd_client::Error) -> Self {
        match err {
            etcd_client::Error::GRpcStatus(status) => Self::from_status(operation, endpoint, &status),
            other => {
                MembershipError::Unreachable { endpoint: endpoint.to_owned(), reason: other.to_string() }
            }
        }
    }

    fn from_status(operation: &'static str, endpoint: &str, status: &tonic::Status) -> Self {
        if transient(status.code()) {
            MembershipError::Unreachable { endpoint: endpoint.to_owned(), reason: status.to_string() }
        } else {
            MembershipError::Refused { operation, message: status.message().to_owned() }
        }
    }
}

/// Codes that say the request did not get an answer from the cluster, rather than a no.
fn transient(code: tonic::Code) -> bool {
    matches!(code, tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled)
}

/// The members of one cluster, as the platforms talk to them. Each change is sent to
/// `leader`, the client URL the leader answered on (`MemberView::leader_url`).
pub trait Members: Send + Sync + 'static {
    /// Each target's own Status, and the MemberList of the one that leads (of the newest
    /// term when none does); targets that do not answer are left out.
    fn ask(&self, targets: &[Target]) -> impl Future<Output = Vec<Answer>> + Send;
    /// Adds a learner that will be reached at `peer_url`; returns its id.
    fn add_learner(
        &self,
        leader: &str,
        peer_url: &str,
    ) -> impl Future<Output = Result<u64, MembershipError>> + Send;
    /// Makes `voters` the voter set in one joint-consensus change.
    fn change_voters(
        &self,
        leader: &str,
        voters: &[u64],
    ) -> impl Future<Output = Result<(), MembershipError>> + Send;
    fn move_leader(&self, leader: &str, to: u64) -> impl Future<Output = Result<(), MembershipError>> + Send;
    fn remove(&self, leader: &str, id: u64) -> impl Future<Output = Result<(), MembershipError>> + Send;
}

/// Real members, over connections kept from one reconcile to the next: every reconcile
/// asks every member, and a new gRPC connection per member and per reconcile costs more
/// than the calls. A connection is dropped when a call on it goes unanswered, so the next
/// call connects afresh (on Kubernetes, a restarted pod has a new address behind its name),
/// and when it has not been used for `IDLE`: the members of a deleted cluster, or removed
/// from one, are never asked again.
#[derive(Default)]
pub struct EtcdMembers {
    open: Mutex<HashMap<String, Open>>,
}

struct Open {
    ops: MemberOps,
    used: Instant,
}

/// Every member of a cluster is asked at least once a minute (a steady cluster's recheck),
/// so a connection idle for this long belongs to no member anyone runs.
const IDLE: Duration = Duration::from_secs(10 * 60);

impl EtcdMembers {
    async fn connection(&self, endpoint: &str) -> Result<MemberOps, MembershipError> {
        if let Some(ops) = self.reuse(endpoint) {
            return Ok(ops);
        }
        let ops = MemberOps::connect(endpoint).await?;
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let entry = open.entry(endpoint.to_owned()).or_insert(Open { ops, used: Instant::now() });
        Ok(entry.ops.clone())
    }

    /// The open connection to `endpoint`, if any, after dropping the idle ones.
    fn reuse(&self, endpoint: &str) -> Option<MemberOps> {
        let now = Instant::now();
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|_, o| now.duration_since(o.used) < IDLE);
        let entry = open.get_mut(endpoint)?;
        entry.used = now;
        Some(entry.ops.clone())
    }

    fn forget(&self, endpoint: &str) {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).remove(endpoint);
    }

    /// Runs `call` on the connection to `endpoint` within `limit`, dropping the connection
    /// when nobody answered (a refusal is an answer: the connection is fine).
    async fn on<T, F>(
        &self,
        endpoint: &str,
        limit: Duration,
        call: impl FnOnce(MemberOps) -> F,
    ) -> Result<T, MembershipError>
    where
        F: Future<Output = Result<T, MembershipError>>,
    {
        let outcome =
            match tokio::time::timeout(limit, async { call(self.connection(endpoint).await?).await }).await {
                Ok(outcome) => outcome,
                Err(_) => Err(MembershipError::Unreachable {
                    endpoint: endpoint.to_owned(),
                    reason: format!("no answer within {limit:?}"),
                }),
            };
        if let Err(MembershipError::Unreachable { .. } | MembershipError::BadEndpoint(_)) = &outcome {
            self.forget(endpoint);
        }
        outcome
    }

    async fn status(&self, target: &Target) -> Option<Answer> {
        let status = self
            .on(&target.client_url, ASK_TIMEOUT, |mut ops| async move { ops.status().await })
            .await
            .inspect_err(|err| tracing::debug!(member = %target.name, "Status: {err}"))
            .ok()?;
        let header = status.header()?;
        Some(Answer {
            name: target.name.clone(),
            client_url: target.client_url.clone(),
            member_id: header.member_id(),
            cluster_id: header.cluster_id(),
            leader: status.leader(),
            raft_term: status.raft_term(),
            raft_index: status.raft_index(),
            applied_index: status.raft_applied_index(),
            is_learner: status.is_learner(),
            members: None,
        })
    }

    async fn list(&self, endpoint: &str) -> Option<Vec<Listed>> {
        let listed = self.on(endpoint, ASK_TIMEOUT, |mut ops| async move { ops.list().await }).await.ok()?;
        Some(
            listed
                .iter()
                .map(|m| Listed {
                    id: m.id(),
                    name: m.name().to_owned(),
                    is_learner: m.is_learner(),
                    peer_urls: m.peer_urls().to_vec(),
                })
                .collect(),
        )
    }

    async fn change<T, F>(
        &self,
        leader: &str,
        call: impl FnOnce(MemberOps) -> F,
    ) -> Result<T, MembershipError>
    where
        F: Future<Output = Result<T, MembershipError>>,
    {
        // The change's own calls have their timeouts; this bounds the whole, which makes
        // up to three (a check, the change, a check after a lost answer).
        self.on(leader, ASK_TIMEOUT * 10, call).await
    }
}

impl Members for EtcdMembers {
    async fn ask(&self, targets: &[Target]) -> Vec<Answer> {
        // All at once: a member that is down costs one timeout, not one per member.
        let mut answers: Vec<Answer> = futures::future::join_all(targets.iter().map(|t| self.status(t)))
            .await
            .into_iter()
            .flatten()
            .collect();
        for at in observe::listing_order(&answers) {
            if let Some(listed) = self.list(&answers[at].client_url).await {
                answers[at].members = Some(listed);
                break;
            }
        }
        answers
    }

    async fn add_learner(&self, leader: &str, peer_url: &str) -> Result<u64, MembershipError> {
        self.change(leader, |mut ops| async move { ops.add_learner(peer_url).await }).await
    }

    async fn change_voters(&self, leader: &str, voters: &[u64]) -> Result<(), MembershipError> {
        self.change(leader, |mut ops| async move { ops.change_voters(voters).await }).await
    }

    async fn move_leader(&self, leader: &str, to: u64) -> Result<(), MembershipError> {
        self.change(leader, |mut ops| async move { ops.move_leader(to).await }).await
    }

    async fn remove(&self, leader: &str, id: u64) -> Result<(), MembershipError> {
        self.change(leader, |mut ops| async move { ops.remove(id).await }).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_open(members: &EtcdMembers, endpoint: &str) -> bool {
        members.open.lock().expect("lock").contains_key(endpoint)
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_no_member_uses_any_more_is_dropped() {
        // Connecting does no I/O (the channels connect on first use), so no member runs here.
        let members = EtcdMembers::default();
        let (kept, left) = ("http://127.0.0.1:9", "http://127.0.0.1:7");
        members.connection(kept).await.expect("connects");
        members.connection(left).await.expect("connects");
        for _ in 0..20 {
            tokio::time::advance(Duration::from_secs(60)).await;
            members.connection(kept).await.expect("reused");
        }
        assert!(is_open(&members, kept), "in use every minute");
        assert!(!is_open(&members, left), "unused for 20 minutes");
    }
}
