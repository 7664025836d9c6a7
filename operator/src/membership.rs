//! Raft membership changes over the etcd v3 API, shared by both platforms.
//!
//! Stand-in on branch `scale-k8s` with the signatures the Kubernetes layer is written
//! against; the version on `scale-local` replaces it at merge.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions, MemberAddOptions};

/// Long enough for a change that has to be committed by a quorum, short enough that a
/// reconcile does not hang on a cluster that cannot commit.
const TIMEOUT: Duration = Duration::from_secs(5);

pub struct MemberOps {
    client: Client,
}

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("etcd API: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("MemberAdd answered without the member it added")]
    NoMemberAdded,
    #[error("{0} is not available in this build")]
    Unsupported(&'static str),
}

impl MemberOps {
    pub async fn connect(endpoints: &[String]) -> Result<Self, MembershipError> {
        let options = ConnectOptions::new().with_connect_timeout(TIMEOUT).with_timeout(TIMEOUT);
        Ok(Self { client: Client::connect(endpoints, Some(options)).await? })
    }

    /// The id of the new learner.
    pub async fn add_learner(&mut self, peer_url: &str) -> Result<u64, MembershipError> {
        let added =
            self.client.member_add([peer_url], Some(MemberAddOptions::new().with_is_learner())).await?;
        added.member().map(|m| m.id()).ok_or(MembershipError::NoMemberAdded)
    }

    pub async fn change_voters(&mut self, _voters: &[u64]) -> Result<(), MembershipError> {
        Err(MembershipError::Unsupported("Admin/ChangeVoters"))
    }

    pub async fn move_leader(&mut self, to: u64) -> Result<(), MembershipError> {
        self.client.move_leader(to).await?;
        Ok(())
    }

    pub async fn remove(&mut self, id: u64) -> Result<(), MembershipError> {
        self.client.member_remove(id).await?;
        Ok(())
    }
}
