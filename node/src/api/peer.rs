//! The peer transport, server side: hands openraft's messages from other members to the
//! local Raft, and serves requests forwarded to this member as leader.

use std::sync::Arc;

use std::pin::Pin;

use futures::{Stream, StreamExt};
use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};
use tonic::{Request, Response, Status, Streaming};

use crate::member::{ForwardRequest, Node};
use crate::proto::raft::raft_peer_server::RaftPeer;
use crate::proto::raft::{RaftMessage, SnapshotChunk};
use crate::raft::network::{decode, encode};
use crate::raft::state_machine::{RaftSnapshot, SnapshotData, snapshot_file_name};
use crate::raft::types::{SnapshotMeta, TypeConfig, Vote};

pub struct PeerService {
    node: Arc<Node>,
    incoming: IncomingSnapshots,
}

impl PeerService {
    pub fn new(node: Arc<Node>, incoming_dir: std::path::PathBuf) -> Self {
        Self { node, incoming: IncomingSnapshots::new(incoming_dir) }
    }
}

/// Where incoming snapshots are written before they are installed: a file of its own for
/// each stream, since a leader may send the same snapshot again while the first stream is
/// still written or installed, and two writers of one file would interleave their chunks.
struct IncomingSnapshots {
    dir: std::path::PathBuf,
    streams: std::sync::atomic::AtomicU64,
}

impl IncomingSnapshots {
    /// What an earlier run left in `dir` (a stream a crash cut short) is removed.
    fn new(dir: std::path::PathBuf) -> Self {
        let _ = std::fs::remove_dir_all(&dir);
        Self { dir, streams: Default::default() }
    }

    fn path(&self, meta: &SnapshotMeta) -> std::io::Result<std::path::PathBuf> {
        std::fs::create_dir_all(&self.dir)?;
        let stream = self.streams.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(self.dir.join(format!("{}.{stream}.incoming", snapshot_file_name(meta))))
    }
}

/// Refuses peer requests from members of another cluster: a member that kept the data of
/// an old cluster, or was pointed at the wrong peers, must not join this one's Raft. And
/// refuses Raft messages meant for another member id at this address (see
/// `raft::network::tag_target`).
pub fn check_peer_request(
    cluster_id: u64,
    member_id: u64,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request: Request<()>| {
        let header = |key| request.metadata().get(key).and_then(|v| v.to_str().ok());
        if let Some(id) = header(crate::member::CLUSTER_ID_HEADER)
            && u64::from_str_radix(id, 16).ok() != Some(cluster_id)
        {
            return Err(Status::failed_precondition(format!(
                "request from a member of cluster {id}; this member belongs to cluster {cluster_id:x}"
            )));
        }
        if let Some(target) = header(crate::member::TARGET_MEMBER_HEADER)
            && u64::from_str_radix(target, 16).ok() != Some(member_id)
        {
            // Unavailable: to the sender, member `target` is not reachable here.
            return Err(Status::unavailable(format!(
                "message for member {target}; this is member {member_id:x}"
            )));
        }
        Ok(request)
    }
}

/// Refuses a request that carries no cluster id (the interceptor above has refused a wrong
/// one). Every Raft message, forwarded write and membership change must say which cluster
/// sent it; only the roster question of a member that does not know its cluster yet (started
/// with `--initial-cluster-state existing`, like etcd's `/members` for a joiner) goes without.
fn require_cluster_id<T>(request: &Request<T>) -> Result<(), Status> {
    if request.metadata().get(crate::member::CLUSTER_ID_HEADER).is_some() {
        return Ok(());
    }
    Err(Status::failed_precondition(format!(
        "peer request without a cluster id (metadata {})",
        crate::member::CLUSTER_ID_HEADER
    )))
}

fn bad_request(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("malformed peer message: {e}"))
}

fn reply<T: serde::Serialize, E: std::fmt::Display>(
    result: Result<T, E>,
) -> Result<Response<RaftMessage>, Status> {
    let result = result.map_err(|e| e.to_string());
    let payload = encode(&result).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(RaftMessage { payload }))
}

/// Writes an incoming snapshot to `path` chunk by chunk as it arrives, then syncs it: a
/// snapshot is as large as the store, so it is never held whole in memory.
async fn receive_snapshot(
    first: &[u8],
    mut rest: impl Stream<Item = Result<SnapshotChunk, Status>> + Unpin,
    path: &std::path::Path,
) -> Result<(), Status> {
    use tokio::io::AsyncWriteExt;
    let mut file = tokio::fs::File::create(path).await?;
    file.write_all(first).await?;
    while let Some(chunk) = rest.next().await {
        file.write_all(&chunk?.data).await?;
    }
    file.sync_all().await?;
    Ok(())
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    type StreamAppendStream = Pin<Box<dyn Stream<Item = Result<RaftMessage, Status>> + Send>>;

    async fn stream_append(
        &self,
        request: Request<Streaming<RaftMessage>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        require_cluster_id(&request)?;
        // A malformed message ends the stream; the leader reconnects and resends.
        let requests = request
            .into_inner()
            .map(|message| {
                message.ok().and_then(|m| decode::<AppendEntriesRequest<TypeConfig>>(&m.payload).ok())
            })
            .take_while(|request| std::future::ready(request.is_some()))
            .filter_map(std::future::ready);
        let replies = self.node.raft.stream_append(requests).map(|result| {
            let result = result.map_err(|e| e.to_string());
            encode(&result)
                .map(|payload| RaftMessage { payload })
                .map_err(|e| Status::internal(e.to_string()))
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn append_entries(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        require_cluster_id(&request)?;
        let rpc: AppendEntriesRequest<TypeConfig> =
            decode(&request.into_inner().payload).map_err(bad_request)?;
        reply(self.node.raft.append_entries(rpc).await)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        require_cluster_id(&request)?;
        let rpc: VoteRequest<TypeConfig> = decode(&request.into_inner().payload).map_err(bad_request)?;
        reply(self.node.raft.vote(rpc).await)
    }

    async fn pre_vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        require_cluster_id(&request)?;
        let rpc: VoteRequest<TypeConfig> = decode(&request.into_inner().payload).map_err(bad_request)?;
        reply(self.node.raft.pre_vote(rpc).await)
    }

    async fn transfer_leader(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        require_cluster_id(&request)?;
        let rpc: TransferLeaderRequest<TypeConfig> =
            decode(&request.into_inner().payload).map_err(bad_request)?;
        reply(self.node.raft.handle_transfer_leader(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftMessage>, Status> {
        require_cluster_id(&request)?;
        let mut chunks = request.into_inner();
        let first = chunks.next().await.ok_or_else(|| bad_request("empty snapshot stream"))??;
        let (vote, meta): (Vote, SnapshotMeta) = decode(&first.header).map_err(bad_request)?;
        let path = self.incoming.path(&meta)?;
        if let Err(e) = receive_snapshot(&first.data, chunks, &path).await {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(e);
        }
        let snapshot = RaftSnapshot { meta, snapshot: SnapshotData::File(path.clone()) };
        let installed = self.node.raft.install_full_snapshot(vote, snapshot).await;
        // Installed or not (a newer snapshot or log is there already), the file has served:
        // an installed one is in the store, which a marker now says is durable.
        let _ = tokio::fs::remove_file(&path).await;
        reply(installed)
    }

    async fn forward(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let tagged = require_cluster_id(&request);
        let forwarded: ForwardRequest = decode(&request.into_inner().payload).map_err(bad_request)?;
        // `Members` too: what it answers is a part of the roster, and builds before the roster
        // question joined with it untagged.
        if !matches!(forwarded, ForwardRequest::Roster | ForwardRequest::Members) {
            tagged?;
        }
        let result = match forwarded {
            ForwardRequest::Members => Ok(self.node.known_members()),
            // A joiner decides from this answer whether it may start empty (see
            // `server::join_existing`): it must include every change committed before it
            // asked, such as the removal of the voter it replaces.
            ForwardRequest::Roster => self.node.read_barrier().await.map(|()| self.node.known_roster()),
            other => self.node.execute_as_leader(other).await,
        };
        let payload = encode(&result).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(RaftMessage { payload }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_incoming_snapshot_is_on_disk_as_its_chunks_arrive() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("s.incoming");
        let (send, receive) = tokio::sync::mpsc::channel(1);
        let rest = tokio_stream::wrappers::ReceiverStream::new(receive);
        let writing = tokio::spawn({
            let path = path.clone();
            async move { receive_snapshot(b"first", rest, &path).await }
        });
        let chunk = |data: &[u8]| Ok(SnapshotChunk { header: Vec::new(), data: data.to_vec() });
        send.send(chunk(b"-second")).await.expect("send");
        // Before the stream ends, what arrived is in the file, not in memory.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::read(&path).unwrap_or_default() != b"first-second" {
            assert!(std::time::Instant::now() < deadline, "the chunks were not written as they arrived");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        send.send(chunk(b"-third")).await.expect("send");
        drop(send);
        writing.await.expect("join").expect("written");
        assert_eq!(std::fs::read(&path).expect("read"), b"first-second-third");
    }

    #[tokio::test]
    async fn two_streams_of_the_same_snapshot_are_written_to_files_of_their_own() {
        let dir = tempfile::tempdir().expect("dir");
        let incoming_dir = dir.path().join("incoming");
        std::fs::create_dir_all(&incoming_dir).expect("dir");
        std::fs::write(incoming_dir.join("left-by-a-crash.incoming"), b"partial").expect("write");
        let incoming = IncomingSnapshots::new(incoming_dir.clone());
        assert!(!incoming_dir.exists(), "what an earlier run left is removed");

        let meta = SnapshotMeta::default();
        let (first, second) = (incoming.path(&meta).expect("path"), incoming.path(&meta).expect("path"));
        let (send_first, receive_first) = tokio::sync::mpsc::channel(1);
        let (send_second, receive_second) = tokio::sync::mpsc::channel(1);
        let writing_first = tokio::spawn({
            let path = first.clone();
            let rest = tokio_stream::wrappers::ReceiverStream::new(receive_first);
            async move { receive_snapshot(b"one:", rest, &path).await }
        });
        let writing_second = tokio::spawn({
            let path = second.clone();
            let rest = tokio_stream::wrappers::ReceiverStream::new(receive_second);
            async move { receive_snapshot(b"two:", rest, &path).await }
        });
        let chunk = |data: &[u8]| Ok(SnapshotChunk { header: Vec::new(), data: data.to_vec() });
        // The chunks of the two streams arrive interleaved.
        for (one, two) in [(&b"a"[..], &b"b"[..]), (b"c", b"d")] {
            send_first.send(chunk(one)).await.expect("send");
            send_second.send(chunk(two)).await.expect("send");
        }
        drop((send_first, send_second));
        writing_first.await.expect("join").expect("written");
        writing_second.await.expect("join").expect("written");
        assert_eq!(std::fs::read(&first).expect("read"), b"one:ac");
        assert_eq!(std::fs::read(&second).expect("read"), b"two:bd");
    }
}
