//! The etcd Cluster service: membership through the log, with etcd's safety checks
//! (decided on the leader, see `Node::execute_as_leader`).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::member::{ForwardRequest, ForwardResponse, Node};
use crate::proto::etcdserverpb::cluster_server::Cluster;
use crate::proto::etcdserverpb::{
    Member, MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse, MemberPromoteRequest,
    MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse, MemberUpdateRequest,
    MemberUpdateResponse,
};

pub struct ClusterService {
    node: Arc<Node>,
}

impl ClusterService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    fn members(&self) -> Vec<Member> {
        let voters = self.node.reported_voters();
        self.node
            .members()
            .into_iter()
            .map(|m| Member {
                id: m.id,
                name: m.member.name,
                peer_ur_ls: m.member.peer_urls,
                client_ur_ls: m.member.client_urls,
                is_learner: !voters.contains(&m.id),
            })
            .collect()
    }

    /// Waits until this member's view of the membership includes the change just made.
    async fn settle(&self) -> Result<(), Status> {
        self.node.read_barrier().await.map_err(Status::from)
    }
}

fn check_urls(urls: &[String]) -> Result<(), Status> {
    if urls.is_empty() {
        return Err(Status::invalid_argument("etcdserver: member peer URLs are not provided"));
    }
    for url in urls {
        let parsed: Result<http::Uri, _> = url.parse();
        match parsed {
            Ok(uri) if uri.scheme().is_some() && uri.host().is_some() => {}
            _ => return Err(Status::invalid_argument(format!("etcdserver: invalid peer URL {url:?}"))),
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        request: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        let request = request.into_inner();
        check_urls(&request.peer_ur_ls)?;
        let id = match self
            .node
            .on_leader(ForwardRequest::AddMember {
                peer_urls: request.peer_ur_ls.clone(),
                learner: request.is_learner,
            })
            .await?
        {
            ForwardResponse::MemberId(id) => id,
            other => return Err(Status::internal(format!("etcdserver: unexpected answer {other:?}"))),
        };
        self.settle().await?;
        let member = Member {
            id,
            name: String::new(),
            peer_ur_ls: request.peer_ur_ls,
            client_ur_ls: Vec::new(),
            is_learner: request.is_learner,
        };
        Ok(Response::new(MemberAddResponse {
            header: Some(self.node.current_header()?),
            member: Some(member),
            members: self.members(),
        }))
    }

    async fn member_remove(
        &self,
        request: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        self.node.on_leader(ForwardRequest::RemoveMember(request.into_inner().id)).await?;
        self.settle().await?;
        Ok(Response::new(MemberRemoveResponse {
            header: Some(self.node.current_header()?),
            members: self.members(),
        }))
    }

    async fn member_update(
        &self,
        request: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        let request = request.into_inner();
        check_urls(&request.peer_ur_ls)?;
        self.node
            .on_leader(ForwardRequest::UpdateMember { id: request.id, peer_urls: request.peer_ur_ls })
            .await?;
        self.settle().await?;
        Ok(Response::new(MemberUpdateResponse {
            header: Some(self.node.current_header()?),
            members: self.members(),
        }))
    }

    async fn member_list(
        &self,
        request: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        if request.into_inner().linearizable {
            self.settle().await?;
        }
        let members = self.members();
        if members.is_empty() {
            // A member joining an existing cluster knows no membership until the leader's
            // first message reaches it; an empty list would tell a client the cluster has
            // no members (etcd fetches the membership before it serves at all).
            return Err(Status::unavailable("etcdserver: this member has not received the membership yet"));
        }
        Ok(Response::new(MemberListResponse { header: Some(self.node.current_header()?), members }))
    }

    async fn member_promote(
        &self,
        request: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        self.node.on_leader(ForwardRequest::PromoteMember(request.into_inner().id)).await?;
        self.settle().await?;
        Ok(Response::new(MemberPromoteResponse {
            header: Some(self.node.current_header()?),
            members: self.members(),
        }))
    }
}
