//! Changing a cluster's membership, the same way on every platform: etcd's Cluster and
//! Maintenance API (MemberAdd as a learner, MemberRemove, MoveLeader) through `etcd-client`,
//! so each call is one `etcdctl` could make, and our Admin service for the one thing etcd's
//! API cannot do: replace the voter set in one joint-consensus step (etcd promotes one
//! learner at a time, which passes through an even voter count).
//!
//! Every operation is idempotent, because the operator may die after a call took effect
//! and before it saw the answer: the next reconcile asks again and must get success.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions, MemberAddOptions};
use tonic::transport::{Channel, Endpoint};

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

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("no member answers at {endpoints}: {reason}")]
    Unreachable { endpoints: String, reason: String },
    /// The cluster answered and said no; `message` is its own words (etcd's error text).
    #[error("{operation} refused: {message}")]
    Refused { operation: &'static str, message: String },
    #[error("no member reports a leader, so leadership cannot be moved")]
    NoLeader,
    #[error("{0:?} is not a usable endpoint")]
    BadEndpoint(String),
}

impl MembershipError {
    /// A call that reached a member and was answered with an error is a refusal; anything
    /// else (connection refused, timed out) means nobody answered.
    fn from_etcd(operation: &'static str, endpoints: &[String], err: etcd_client::Error) -> Self {
        match err {
            etcd_client::Error::GRpcStatus(status) if !transient(status.code()) => {
                MembershipError::Refused { operation, message: status.message().to_owned() }
            }
            other => {
                MembershipError::Unreachable { endpoints: endpoints.join(","), reason: other.to_string() }
            }
        }
    }

    fn from_status(operation: &'static str, endpoints: &[String], status: &tonic::Status) -> Self {
        if transient(status.code()) {
            MembershipError::Unreachable { endpoints: endpoints.join(","), reason: status.to_string() }
        } else {
            MembershipError::Refused { operation, message: status.message().to_owned() }
        }
    }
}

/// Codes that say the request did not get an answer from the cluster, rather than a no.
fn transient(code: tonic::Code) -> bool {
    matches!(code, tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled)
}

/// Membership operations against one cluster, through the client endpoints given.
pub struct MemberOps {
    endpoints: Vec<String>,
    client: Client,
    admin: AdminClient<Channel>,
}

impl MemberOps {
    /// Connects to the members at `endpoints` (client URLs); any answering member will do,
    /// the members forward what only the leader can do. Pass the leader's endpoint alone
    /// when it is known: a member that a change removes (or one being demoted) never passes
    /// the answer back, and the call would wait for its timeout.
    pub async fn connect(endpoints: &[String]) -> Result<Self, MembershipError> {
        if endpoints.is_empty() {
            return Err(MembershipError::Unreachable {
                endpoints: String::new(),
                reason: "no endpoint given".to_owned(),
            });
        }
        let client = connect_etcd(endpoints).await?;
        let channels = endpoints
            .iter()
            .map(|e| {
                Endpoint::from_shared(e.clone())
                    .map(|e| e.connect_timeout(CONNECT_TIMEOUT).timeout(CALL_TIMEOUT))
                    .map_err(|_| MembershipError::BadEndpoint(e.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let admin = AdminClient::new(Channel::balance_list(channels.into_iter()));
        Ok(Self { endpoints: endpoints.to_vec(), client, admin })
    }

    /// Adds the member with `peer_url` as a learner (MemberAdd --learner) and returns its id;
    /// when a member with that peer URL exists already, returns its id and changes nothing.
    pub async fn add_learner(&mut self, peer_url: &str) -> Result<u64, MembershipError> {
        if let Some(id) = self.member_with_peer_url(peer_url).await? {
            return Ok(id);
        }
        let added = self.client.member_add([peer_url], Some(MemberAddOptions::new().with_is_learner())).await;
        match added {
            Ok(response) => match response.member() {
                Some(member) => Ok(member.id()),
                // An answer without the member: ask the list, which is the truth anyway.
                None => self.member_with_peer_url(peer_url).await?.ok_or_else(|| MembershipError::Refused {
                    operation: "MemberAdd",
                    message: "the answer named no member and none has the peer URL".to_owned(),
                }),
            },
            // Someone (an earlier call whose answer we lost) added it meanwhile.
            Err(err) => match self.member_with_peer_url(peer_url).await? {
                Some(id) => Ok(id),
                None => Err(MembershipError::from_etcd("MemberAdd", &self.endpoints, err)),
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
            .map_err(|status| MembershipError::from_status("ChangeVoters", &self.endpoints, &status))
    }

    /// Moves leadership to member `to` (MoveLeader), sent to the leader, the only member
    /// etcd accepts it on. Already leading is success.
    pub async fn move_leader(&mut self, to: u64) -> Result<(), MembershipError> {
        let (leader, endpoint) = self.find_leader().await?;
        if leader == to {
            return Ok(());
        }
        let mut client = connect_etcd(std::slice::from_ref(&endpoint)).await?;
        client
            .move_leader(to)
            .await
            .map(|_| ())
            .map_err(|err| MembershipError::from_etcd("MoveLeader", std::slice::from_ref(&endpoint), err))
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
                _ => Err(MembershipError::from_etcd("MemberRemove", &self.endpoints, err)),
            },
        }
    }

    async fn listed(&mut self) -> Result<Vec<etcd_client::Member>, MembershipError> {
        let list = self
            .client
            .member_list()
            .await
            .map_err(|err| MembershipError::from_etcd("MemberList", &self.endpoints, err))?;
        Ok(list.members().to_vec())
    }

    async fn listed_ids(&mut self) -> Result<Vec<u64>, MembershipError> {
        Ok(self.listed().await?.iter().map(etcd_client::Member::id).collect())
    }

    async fn member_with_peer_url(&mut self, peer_url: &str) -> Result<Option<u64>, MembershipError> {
        Ok(self.listed().await?.iter().find(|m| m.peer_urls().iter().any(|u| u == peer_url)).map(|m| m.id()))
    }

    /// The leader's id and the endpoint (of ours) it answers on: the member whose Status
    /// names itself as leader.
    async fn find_leader(&self) -> Result<(u64, String), MembershipError> {
        for endpoint in &self.endpoints {
            let Ok(mut client) = connect_etcd(std::slice::from_ref(endpoint)).await else { continue };
            let Ok(status) = client.status().await else { continue };
            let Some(header) = status.header() else { continue };
            if status.leader() != 0 && status.leader() == header.member_id() {
                return Ok((status.leader(), endpoint.clone()));
            }
        }
        Err(MembershipError::NoLeader)
    }
}

async fn connect_etcd(endpoints: &[String]) -> Result<Client, MembershipError> {
    let options = ConnectOptions::new().with_connect_timeout(CONNECT_TIMEOUT).with_timeout(CALL_TIMEOUT);
    Client::connect(endpoints, Some(options)).await.map_err(|err| MembershipError::Unreachable {
        endpoints: endpoints.join(","),
        reason: err.to_string(),
    })
}
