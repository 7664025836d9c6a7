//! The Admin service (proto/admin): membership operations etcd's API has no words for,
//! decided on the leader (see `Node::execute_as_leader`).

use std::collections::BTreeSet;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::member::{ForwardRequest, ForwardResponse, Node};
use crate::proto::admin::admin_server::Admin;
use crate::proto::admin::{ChangeVotersRequest, ChangeVotersResponse};

pub struct AdminService {
    node: Arc<Node>,
}

impl AdminService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn change_voters(
        &self,
        request: Request<ChangeVotersRequest>,
    ) -> Result<Response<ChangeVotersResponse>, Status> {
        let voters: BTreeSet<u64> = request.into_inner().voter_ids.into_iter().collect();
        let (voter_ids, learner_ids) = match self.node.on_leader(ForwardRequest::ChangeVoters(voters)).await?
        {
            ForwardResponse::Membership { voters, learners } => (voters, learners),
            other => return Err(Status::internal(format!("etcdserver: unexpected answer {other:?}"))),
        };
        // A MemberList sent to this member right after the answer must see the change.
        self.node.read_barrier().await?;
        let header = self.node.current_header()?;
        Ok(Response::new(ChangeVotersResponse {
            cluster_id: header.cluster_id,
            member_id: header.member_id,
            raft_term: header.raft_term,
            voter_ids,
            learner_ids,
        }))
    }
}
