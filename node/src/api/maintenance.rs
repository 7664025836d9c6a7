//! The etcd Maintenance service. Snapshot, Hash, HashKV and Defragment act on this member's
//! own store, as etcd's do; MoveLeader needs the leader.

use openraft::async_runtime::WatchReceiver;
use std::io::Read;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status};

use prost::Message;

use crate::member::{ForwardRequest, Node};
use crate::proto::etcdserverpb::AlarmType;
use crate::proto::etcdserverpb::alarm_request::AlarmAction;
use crate::proto::etcdserverpb::maintenance_server::Maintenance;
use crate::proto::etcdserverpb::{
    AlarmRequest, AlarmResponse, DefragmentRequest, DefragmentResponse, HashKvRequest, HashKvResponse,
    HashRequest, HashResponse, MoveLeaderRequest, MoveLeaderResponse, ResponseHeader, SnapshotRequest,
    SnapshotResponse, StatusRequest, StatusResponse,
};
use crate::raft::state_machine::{SNAPSHOT_CHECKSUM_LEN, StoreSnapshot, snapshot_of_store};
use crate::raft::types::Command;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub struct MaintenanceService {
    node: Arc<Node>,
}

impl MaintenanceService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

/// Bytes of snapshot per message: well under gRPC's default 4 MiB message limit, large enough
/// that per-message overhead does not matter.
const SNAPSHOT_CHUNK: usize = 64 * 1024;

/// Runs storage work off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(work).await.map_err(|e| Status::internal(format!("etcdserver: {e}")))?
}

fn snapshot_error(e: std::io::Error) -> Status {
    Status::internal(format!("etcdserver: snapshot: {e}"))
}

/// Sends the snapshot in `file` (`len` bytes) as etcd does: the data in chunks with
/// `remaining_bytes` counting down to 0, then one last message carrying only the SHA-256 of
/// everything before it. Our file format already ends in that checksum, so the
/// concatenated blobs are the file itself. Stops quietly when the client has gone.
fn send_snapshot(
    file: std::fs::File,
    len: u64,
    header: ResponseHeader,
    out: tokio::sync::mpsc::Sender<Result<SnapshotResponse, Status>>,
) {
    let message = |remaining_bytes: u64, blob: Vec<u8>| SnapshotResponse {
        header: Some(header),
        remaining_bytes,
        blob,
        version: VERSION.to_owned(),
    };
    let body_len = len.saturating_sub(SNAPSHOT_CHECKSUM_LEN);
    let mut reader = std::io::BufReader::with_capacity(SNAPSHOT_CHUNK, file);
    let mut sent = 0u64;
    while sent < body_len {
        let size = (body_len - sent).min(SNAPSHOT_CHUNK as u64) as usize;
        let mut blob = vec![0u8; size];
        if let Err(e) = reader.read_exact(&mut blob) {
            let _ = out.blocking_send(Err(snapshot_error(e)));
            return;
        }
        sent += size as u64;
        if out.blocking_send(Ok(message(body_len - sent, blob))).is_err() {
            return;
        }
    }
    let mut checksum = vec![0u8; SNAPSHOT_CHECKSUM_LEN as usize];
    let last = match reader.read_exact(&mut checksum) {
        Ok(()) => Ok(message(0, checksum)),
        Err(e) => Err(snapshot_error(e)),
    };
    let _ = out.blocking_send(last);
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    type SnapshotStream = Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send>>;

    async fn alarm(&self, request: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        let request = request.into_inner();
        match AlarmAction::try_from(request.action) {
            Ok(AlarmAction::Get) => {
                self.node.read_barrier().await?;
                let view = self.node.store.read()?;
                let alarms = crate::kv::alarms_of(&view)?
                    .into_iter()
                    .filter(|a| request.member_id == 0 || a.member_id == request.member_id)
                    .filter(|a| request.alarm == AlarmType::None as i32 || a.alarm == request.alarm)
                    .collect();
                Ok(Response::new(AlarmResponse { header: Some(self.node.header(view.revision()?)), alarms }))
            }
            Ok(AlarmAction::Activate | AlarmAction::Deactivate) => {
                let mut response: AlarmResponse =
                    super::propose(&self.node, Command::Alarm(request.encode_to_vec())).await?;
                response.header = Some(self.node.current_header()?);
                Ok(Response::new(response))
            }
            Err(_) => Err(Status::invalid_argument("etcdserver: unknown alarm action")),
        }
    }

    async fn status(&self, _request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let metrics = self.node.raft.metrics().borrow_watched().clone();
        let db_size = self.node.db_size() as i64;
        let store = self.node.store.clone();
        let db_size_in_use = blocking(move || Ok(store.size_in_use()?)).await? as i64;
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
            errors: crate::kv::alarms_of(&self.node.store.read()?)?
                .iter()
                .map(|a| {
                    let kind = AlarmType::try_from(a.alarm).map_or("UNKNOWN", |t| t.as_str_name());
                    format!("memberID:{} alarm:{kind} ", a.member_id)
                })
                .collect(),
            // The file may have grown since it was measured; never report more in use than
            // the size reported beside it.
            db_size_in_use: db_size_in_use.min(db_size),
            is_learner,
        }))
    }

    async fn defragment(
        &self,
        _request: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        let store = self.node.store.clone();
        blocking(move || Ok(store.defragment()?)).await?;
        tracing::info!("defragmented the key-value store");
        Ok(Response::new(DefragmentResponse { header: Some(self.node.current_header()?) }))
    }

    async fn hash(&self, _request: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        let store = self.node.store.clone();
        let (revision, hash) = blocking(move || {
            let view = store.read()?;
            Ok((view.revision()?, view.hash_all()?))
        })
        .await?;
        Ok(Response::new(HashResponse { header: Some(self.node.header(revision)), hash }))
    }

    async fn hash_kv(&self, request: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        let revision = request.into_inner().revision;
        let store = self.node.store.clone();
        let (current, hashed) = blocking(move || {
            let view = store.read()?;
            Ok((view.revision()?, view.hash_kv(revision)?))
        })
        .await?;
        Ok(Response::new(HashKvResponse {
            header: Some(self.node.header(current)),
            hash: hashed.hash,
            compact_revision: hashed.compact_revision,
            hash_revision: hashed.revision,
        }))
    }

    async fn snapshot(
        &self,
        _request: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let store = self.node.store.clone();
        let dir = self.node.db_path.parent().unwrap_or(std::path::Path::new(".")).to_path_buf();
        // The file is written from one read transaction, which ends before streaming starts:
        // a slow client holds only an unlinked file, not the store (defragmentation waits
        // for open transactions).
        let StoreSnapshot { revision, len, file, .. } =
            blocking(move || snapshot_of_store(&store, &dir).map_err(snapshot_error)).await?;
        tracing::info!(revision, bytes = len, "sending a snapshot to a client");
        let header = self.node.header(revision);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || send_snapshot(file, len, header, tx));
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
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
