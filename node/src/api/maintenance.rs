//! The etcd Maintenance service: Status and MoveLeader. Snapshot, HashKV, Alarm and
//! Defragment answer `Unimplemented` with a message until they are built.

use openraft::async_runtime::WatchReceiver;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status};

use crate::member::{ForwardRequest, Node};
use crate::proto::etcdserverpb::maintenance_server::Maintenance;
use crate::proto::etcdserverpb::{
    AlarmRequest, AlarmResponse, DefragmentRequest, DefragmentResponse, HashKvRequest, HashKvResponse,
    HashRequest, HashResponse, MoveLeaderRequest, MoveLeaderResponse, SnapshotRequest, SnapshotResponse,
    StatusRequest, StatusResponse,
};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub struct MaintenanceService {
    node: Arc<Node>,
}

impl MaintenanceService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

fn not_yet(what: &str) -> Status {
    Status::unimplemented(format!("etcdserver: {what} is not served by this member yet"))
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    type SnapshotStream = Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send>>;

    async fn alarm(&self, _request: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        // No alarm is ever raised by this member yet, so the list is truthfully empty.
        Ok(Response::new(AlarmResponse { header: Some(self.node.current_header()?), alarms: Vec::new() }))
    }

    async fn status(&self, _request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let metrics = self.node.raft.metrics().borrow_watched().clone();
        let db_size = std::fs::metadata(&self.node.db_path).map(|m| m.len() as i64).unwrap_or(0);
        let is_learner =
            metrics.membership_config.membership().learner_ids().any(|id| id == self.node.identity.member_id);
        Ok(Response::new(StatusResponse {
            header: Some(self.node.current_header()?),
            version: VERSION.to_owned(),
            db_size,
            leader: metrics.current_leader.unwrap_or(0),
            raft_index: metrics.last_log_index.unwrap_or(0),
            raft_term: metrics.current_term,
            raft_applied_index: metrics.last_applied.map_or(0, |id| id.index),
            errors: Vec::new(),
            db_size_in_use: db_size,
            is_learner,
        }))
    }

    async fn defragment(
        &self,
        _request: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        Err(not_yet("Defragment"))
    }

    async fn hash(&self, _request: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        Err(not_yet("Hash"))
    }

    async fn hash_kv(&self, _request: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        Err(not_yet("HashKV"))
    }

    async fn snapshot(
        &self,
        _request: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        Err(not_yet("Snapshot"))
    }

    async fn move_leader(
        &self,
        request: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        let target = request.into_inner().target_id;
        // etcd only accepts MoveLeader on the leader itself.
        if self.node.current_leader() != Some(self.node.identity.member_id) {
            return Err(Status::failed_precondition("etcdserver: not leader"));
        }
        self.node.on_leader(ForwardRequest::TransferLeader(target)).await?;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut metrics = self.node.raft.metrics();
        while metrics.borrow_watched().current_leader != Some(target) {
            if tokio::time::timeout_at(deadline, metrics.changed()).await.is_err() {
                return Err(Status::unavailable(
                    "etcdserver: request timed out, leader transfer took too long",
                ));
            }
        }
        Ok(Response::new(MoveLeaderResponse { header: Some(self.node.current_header()?) }))
    }
}
