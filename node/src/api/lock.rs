//! etcd's Lock service over the contender queue (`ownership`): Lock joins the queue under
//! the caller's lease and answers once the caller's key is first; the key's create revision
//! (the response header's revision when the key is new) orders holders, a fencing token.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::errors::ApplyError;
use super::ownership;
use crate::member::Node;
use crate::proto::etcdserverpb::DeleteRangeRequest;
use crate::proto::v3lockpb::lock_server::Lock;
use crate::proto::v3lockpb::{LockRequest, LockResponse, UnlockRequest, UnlockResponse};
use crate::raft::types::Command;

/// etcd's message when a lock waiter's key is deleted under it.
const KEY_LOST: &str = "mutex: session is expired";

pub struct LockService {
    node: Arc<Node>,
}

impl LockService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    async fn lock(&self, request: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let request = request.into_inner();
        if request.name.is_empty() {
            return Err(ApplyError::EmptyKey.into());
        }
        let key = ownership::contender_key(&request.name, request.lease);
        let (claim, leave) = ownership::claim_guarded(&self.node, &key, request.lease, Vec::new()).await?;
        ownership::wait_first(&self.node, &ownership::prefix(&request.name), &claim.kv, KEY_LOST).await?;
        leave.disarm();
        Ok(Response::new(LockResponse { header: Some(claim.header), key }))
    }

    async fn unlock(&self, request: Request<UnlockRequest>) -> Result<Response<UnlockResponse>, Status> {
        let request = request.into_inner();
        if request.key.is_empty() {
            return Err(ApplyError::EmptyKey.into());
        }
        // As etcd does: whatever generation of the key is there goes, the caller named it.
        let delete = DeleteRangeRequest { key: request.key, ..DeleteRangeRequest::default() };
        let mut response: crate::proto::etcdserverpb::DeleteRangeResponse =
            super::propose(&self.node, Command::DeleteRange(prost::Message::encode_to_vec(&delete))).await?;
        super::finish_header(&self.node, &mut response.header);
        Ok(Response::new(UnlockResponse { header: response.header }))
    }
}
