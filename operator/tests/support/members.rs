//! Fake members behind the operator's `Members` seam: each one answers on its own URL as a
//! real member would for the cluster a test describes (and changes between reconciles), and
//! every URL asked and every change asked for is recorded, so a test can say where the
//! operator went.

use std::sync::Mutex;

use consensus_operator::membership::{Answer, Listed, Members, MembershipError, Target};

/// The Raft cluster id the fake members report.
pub const CLUSTER_ID: u64 = 0xc1;
/// The term every fake member is in.
const TERM: u64 = 2;

/// One member as the fake cluster has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: u64,
    pub name: String,
    pub is_learner: bool,
    /// It has started once: etcd lists a member added but never started without a name.
    pub started: bool,
    /// It answers Status now.
    pub answers: bool,
    pub applied_index: u64,
    pub raft_index: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cluster {
    pub members: Vec<Member>,
    /// What every started member reports as the leader; `None` while they elect one.
    pub leader: Option<u64>,
}

/// One membership change the members were asked for, and the URL it was sent to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asked {
    AddLearner { endpoint: String, peer_url: String },
    ChangeVoters { endpoint: String, voters: Vec<u64> },
    MoveLeader { endpoint: String, to: u64 },
    Remove { endpoint: String, id: u64 },
}

#[derive(Default)]
pub struct FakeMembers {
    /// `None`: nobody answers (no member runs).
    cluster: Mutex<Option<Cluster>>,
    asked: Mutex<Vec<String>>,
    changes: Mutex<Vec<Asked>>,
    /// Refuse every change, as a cluster whose learner is not caught up does.
    refuse: bool,
}

impl FakeMembers {
    pub fn answering(cluster: Cluster) -> Self {
        Self { cluster: Mutex::new(Some(cluster)), ..Self::default() }
    }

    /// Refusing every change, as a cluster whose learner is not caught up does.
    pub fn refusing(self) -> Self {
        Self { refuse: true, ..self }
    }

    pub fn unreachable() -> Self {
        Self::default()
    }

    /// What the members answer from now on.
    // Each test crate compiles this module on its own; only scaling.rs needs this.
    #[allow(dead_code)]
    pub fn now(&self, cluster: Cluster) {
        *self.cluster.lock().expect("lock") = Some(cluster);
    }

    /// The client URLs asked for Status, in order.
    pub fn asked(&self) -> Vec<String> {
        self.asked.lock().expect("lock").clone()
    }

    pub fn changes(&self) -> Vec<Asked> {
        self.changes.lock().expect("lock").clone()
    }

    fn record(&self, asked: Asked) -> Result<(), MembershipError> {
        self.changes.lock().expect("lock").push(asked);
        if self.refuse {
            return Err(MembershipError::Refused {
                operation: "fake",
                message: "a learner is not caught up".to_owned(),
            });
        }
        Ok(())
    }
}

/// `demo-3` -> `http://demo-3.demo-peer.default.svc:2380`, the peer URL the operator adds it at.
fn peer_url(name: &str) -> String {
    format!("http://{name}.demo-peer.default.svc:2380")
}

impl Members for FakeMembers {
    async fn ask(&self, targets: &[Target]) -> Vec<Answer> {
        self.asked.lock().expect("lock").extend(targets.iter().map(|t| t.client_url.clone()));
        let Some(cluster) = self.cluster.lock().expect("lock").clone() else { return Vec::new() };
        let listed: Vec<Listed> = cluster
            .members
            .iter()
            .map(|m| Listed {
                id: m.id,
                name: if m.started { m.name.clone() } else { String::new() },
                is_learner: m.is_learner,
                peer_urls: vec![peer_url(&m.name)],
            })
            .collect();
        targets
            .iter()
            .filter_map(|target| {
                let member = cluster.members.iter().find(|m| m.name == target.name && m.answers)?;
                Some(Answer {
                    name: target.name.clone(),
                    client_url: target.client_url.clone(),
                    member_id: member.id,
                    cluster_id: CLUSTER_ID,
                    leader: cluster.leader.unwrap_or(0),
                    raft_term: TERM,
                    raft_index: member.raft_index,
                    applied_index: member.applied_index,
                    is_learner: member.is_learner,
                    members: Some(listed.clone()),
                })
            })
            .collect()
    }

    async fn add_learner(&self, leader: &str, peer_url: &str) -> Result<u64, MembershipError> {
        self.record(Asked::AddLearner { endpoint: leader.to_owned(), peer_url: peer_url.to_owned() })?;
        // The id the members would give demo-3, demo-4, ... in order (demo-i has 0x10 + i).
        Ok(0x12 + self.changes().len() as u64)
    }

    async fn change_voters(&self, leader: &str, voters: &[u64]) -> Result<(), MembershipError> {
        self.record(Asked::ChangeVoters { endpoint: leader.to_owned(), voters: voters.to_vec() })
    }

    async fn move_leader(&self, leader: &str, to: u64) -> Result<(), MembershipError> {
        self.record(Asked::MoveLeader { endpoint: leader.to_owned(), to })
    }

    async fn remove(&self, leader: &str, id: u64) -> Result<(), MembershipError> {
        self.record(Asked::Remove { endpoint: leader.to_owned(), id })
    }
}
