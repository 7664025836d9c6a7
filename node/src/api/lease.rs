//! The etcd Lease service. Grants and revokes go through the log; keep-alives and
//! time-to-live questions go to the leader, which alone keeps lease deadlines (see `lease`).

use std::hash::{BuildHasher, RandomState};
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::errors::ServerError;
use super::propose;
use crate::lease::MAX_LEASE_TTL;
use crate::member::{ForwardRequest, ForwardResponse, Node};
use crate::proto::etcdserverpb::lease_server::Lease;
use crate::proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseLeasesRequest,
    LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus, LeaseTimeToLiveRequest,
    LeaseTimeToLiveResponse,
};
use crate::raft::types::Command;

pub struct LeaseService {
    node: Arc<Node>,
}

impl LeaseService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

/// A fresh positive lease id; a collision with an existing lease is refused by the apply
/// layer (`lease already exists`), like a client-chosen duplicate.
fn new_lease_id() -> i64 {
    let random = RandomState::new().hash_one(std::time::SystemTime::now());
    (random >> 1).max(1) as i64
}

/// The TTL a grant gets: etcd's bounds, raised to the minimum that outlives an election.
fn granted_ttl(requested: i64, min_ttl: i64) -> Result<i64, ServerError> {
    if requested > MAX_LEASE_TTL {
        return Err(ServerError::LeaseTtlTooLarge);
    }
    Ok(requested.max(min_ttl))
}

async fn keep_alive(node: &Node, id: i64) -> Result<LeaseKeepAliveResponse, Status> {
    match node.on_leader(ForwardRequest::LeaseKeepAlive(id)).await? {
        // etcd answers TTL 0 for a lease that does not exist, rather than an error.
        ForwardResponse::LeaseTtl(ttl) => {
            Ok(LeaseKeepAliveResponse { header: Some(node.current_header()?), id, ttl })
        }
        other => Err(Status::internal(format!("etcdserver: unexpected answer to a keep-alive: {other:?}"))),
    }
}

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Lease for LeaseService {
    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_grant(
        &self,
        request: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let request = request.into_inner();
        super::quota::check(&self.node, super::quota::LEASE_COST).await?;
        let grant = LeaseGrantRequest {
            ttl: granted_ttl(request.ttl, self.node.leases.min_ttl)?,
            id: if request.id == 0 { new_lease_id() } else { request.id },
        };
        let mut response: LeaseGrantResponse =
            propose(&self.node, Command::LeaseGrant(grant.encode_to_vec())).await?;
        super::finish_header(&self.node, &mut response.header);
        Ok(Response::new(response))
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let request = request.into_inner();
        let mut response: LeaseRevokeResponse =
            propose(&self.node, Command::LeaseRevoke(request.encode_to_vec())).await?;
        super::finish_header(&self.node, &mut response.header);
        Ok(Response::new(response))
    }

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut requests = request.into_inner();
        let node = self.node.clone();
        let (responses, stream) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let answer = match requests.message().await {
                    Ok(Some(request)) => keep_alive(&node, request.id).await,
                    Ok(None) => return,
                    Err(status) => Err(status),
                };
                let failed = answer.is_err();
                if responses.send(answer).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(stream))))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let request = request.into_inner();
        let status = match self.node.on_leader(ForwardRequest::LeaseTimeToLive(request.id)).await? {
            ForwardResponse::LeaseTimeToLive(status) => status,
            other => {
                return Err(Status::internal(format!(
                    "etcdserver: unexpected answer to time-to-live: {other:?}"
                )));
            }
        };
        let header = Some(self.node.current_header()?);
        // etcd answers TTL -1 for a lease that does not exist, rather than an error.
        let response = match status {
            None => LeaseTimeToLiveResponse { header, id: request.id, ttl: -1, ..Default::default() },
            Some(status) => LeaseTimeToLiveResponse {
                header,
                id: request.id,
                ttl: status.remaining,
                granted_ttl: status.granted,
                keys: if request.keys { status.keys } else { Vec::new() },
            },
        };
        Ok(Response::new(response))
    }

    async fn lease_leases(
        &self,
        _request: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        self.node.read_barrier().await?;
        let view = self.node.store.read()?;
        let leases = view.leases()?.into_iter().map(|(id, _)| LeaseStatus { id }).collect();
        Ok(Response::new(LeaseLeasesResponse { header: Some(self.node.header(view.revision()?)), leases }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_are_bounded_as_etcd_bounds_them() {
        assert_eq!(granted_ttl(1, 2), Ok(2));
        assert_eq!(granted_ttl(60, 2), Ok(60));
        assert_eq!(granted_ttl(MAX_LEASE_TTL + 1, 2), Err(ServerError::LeaseTtlTooLarge));
    }

    #[test]
    fn generated_lease_ids_are_positive_and_vary() {
        let ids: std::collections::BTreeSet<i64> = (0..100).map(|_| new_lease_id()).collect();
        assert!(ids.iter().all(|id| *id > 0));
        assert!(ids.len() > 90);
    }
}
