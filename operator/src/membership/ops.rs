//! The calls to one member: etcd's Cluster and Maintenance API (Status, MemberList,
//! MemberAdd as a learner, MemberRemove, MoveLeader) through `etcd-client`, so each call is
//! one `etcdctl` could make, and our Admin service for the one thing etcd's API cannot do:
//! replace the voter set in one joint-consensus step (etcd promotes one learner at a time,
//! which passes through an even voter count).
//!
//! Every change is idempotent, because the operator may die after a call took effect and
//! before it saw the answer: the next reconcile asks again and must get success.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions, MemberAddOptions, StatusResponse};
use tonic::transport::{Channel, Endpoint};

use super::MembershipError;

/// Generated client of `node/proto/admin/admin.proto`.
pub mod admin {
    tonic::include_proto!("consensus.admin.v1");
}

use admin::ChangeVotersRequest;
use admin::admin_client::AdminClient;

/// Members on one network answer in milliseconds; a membership change commits through one
/// Raft round (two for joint consensus), so this leaves a wide margin without letting one
/// dead endpoint stall a reconcile for long.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Connections to the member at one client URL. Cloning shares them: both clients are
/// handles on channels that reconnect by themselves.
#[derive(Clone)]
pub struct MemberOps {
    endpoint: String,
    client: Client,
    admin: AdminClient<Channel>,
}

impl MemberOps {
    /// Connects to the member at `endpoint` (a client URL). Membership changes must be sent
    /// to the leader's: another member forwards them, but a member that a change removes
    /// (or demotes) never passes the answer back, and MoveLeader is refused off the leader.
    pub async fn connect(endpoint: &str) -> Result<Self, MembershipError> {
        let options = ConnectOptions::new().with_connect_timeout(CONNECT_TIMEOUT).with_timeout(CALL_TIMEOUT);
        let client = Client::connect([endpoint], Some(options)).await.map_err(|err| {
            MembershipError::Unreachable { endpoint: endpoint.to_owned(), reason: err.to_string() }
        })?;
        let admin = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|_| MembershipError::BadEndpoint(endpoint.to_owned()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            // Only ChangeVoters uses it: observing a member opens no second connection.
            .connect_lazy();
        Ok(Self { endpoint: endpoint.to_owned(), client, admin: AdminClient::new(admin) })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The member's own Status: its id, its term, the leader it knows, its indexes.
    pub async fn status(&mut self) -> Result<StatusResponse, MembershipError> {
        self.client.status().await.map_err(|err| self.etcd_error("Status", err))
    }

    /// The membership as this member knows it (MemberList, served from its own state).
    pub async fn list(&mut self) -> Result<Vec<etcd_client::Member>, MembershipError> {
        let list = self.client.member_list().await.map_err(|err| self.etcd_error("MemberList", err))?;
        Ok(list.members().to_vec())
    }

    /// Adds the member with `peer_url` as a learner (MemberAdd --learner) and returns its id;
    /// when a learner with that peer URL exists already, returns its id and changes nothing.
    /// A voter at that URL is not the one asked for: it is the member that lost its data,
    /// which the new learner replaces.
    pub async fn add_learner(&mut self, peer_url: &str) -> Result<u64, MembershipError> {
        if let Some(id) = self.learner_with_peer_url(peer_url).await? {
            return Ok(id);
        }
        let added = self.client.member_add([peer_url], Some(MemberAddOptions::new().with_is_learner())).await;
        match added {
            Ok(response) => match response.member() {
                Some(member) => Ok(member.id()),
                // An answer without the member: ask the list, which is the truth anyway.
                None => self.learner_with_peer_url(peer_url).await?.ok_or_else(|| MembershipError::Refused {
                    operation: "MemberAdd",
                    message: "the answer named no member and none has the peer URL".to_owned(),
                }),
            },
            // Someone (an earlier call whose answer we lost) added it meanwhile.
            Err(err) => match self.learner_with_peer_url(peer_url).await? {
                Some(id) => Ok(id),
                None => Err(self.etcd_error("MemberAdd", err)),
            },
        }
    }

    /// Makes `voters` the voter set in one joint-consensus step (Admin/ChangeVoters); voters
    /// left out become learners. Asking for the current voter set changes nothing.
    pub async fn change_voters(&mut self, voters: &[u64]) -> Result<(), MembershipError> {
        let request = ChangeVotersRequest { voter_ids: voters.to_vec() };
        self.admin
            .change_voters(request)
            .await
            .map(|_| ())
            .map_err(|status| MembershipError::from_status("ChangeVoters", &self.endpoint, &status))
    }

    /// Moves leadership to member `to` (MoveLeader); etcd accepts it only on the leader.
    /// Already leading is success.
    pub async fn move_leader(&mut self, to: u64) -> Result<(), MembershipError> {
        if self.status().await?.leader() == to {
            return Ok(());
        }
        self.client.move_leader(to).await.map(|_| ()).map_err(|err| self.etcd_error("MoveLeader", err))
    }

    /// Removes member `id` (MemberRemove); a member that is not there is success.
    pub async fn remove(&mut self, id: u64) -> Result<(), MembershipError> {
        if !self.listed_ids().await?.contains(&id) {
            return Ok(());
        }
        match self.client.member_remove(id).await {
            Ok(_) => Ok(()),
            Err(etcd_client::Error::GRpcStatus(status)) if status.code() == tonic::Code::NotFound => Ok(()),
            Err(err) => match self.listed_ids().await {
                Ok(ids) if !ids.contains(&id) => Ok(()),
                _ => Err(self.etcd_error("MemberRemove", err)),
            },
        }
    }

    async fn listed_ids(&mut self) -> Result<Vec<u64>, MembershipError> {
        Ok(self.list().await?.iter().map(etcd_client::Member::id).collect())
    }

    async fn learner_with_peer_url(&mut self, peer_url: &str) -> Result<Option<u64>, MembershipError> {
        let listed = self.list().await?;
        Ok(listed
            .iter()
            .find(|m| m.is_learner() && m.peer_urls().iter().any(|u| u == peer_url))
            .map(|m| m.id()))
    }

    fn etcd_error(&self, operation: &'static str, err: etcd_client::Error) -> MembershipError {
        MembershipError::from_etcd(operation, &self.endpoint, err)
    }
}
