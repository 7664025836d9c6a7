//! The peer transport, client side: openraft's messages to other members over gRPC.
//!
//! Connections are lazy and tonic reconnects them with backoff; openraft backs off from
//! members it finds unreachable. Every call carries openraft's deadline for it.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use openraft::base::{BoxFuture, BoxStream};
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::vote::RaftLeaderId;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, Endpoint};

use super::state_machine::{RaftSnapshot, SnapshotData, snapshot_of_store};
use super::types::{Member, SnapshotMeta, TypeConfig, Vote};
use crate::kv::MvccStore;
use crate::metrics::Metrics;
use crate::proto::raft::raft_peer_client::RaftPeerClient;
use crate::proto::raft::{RaftMessage, SnapshotChunk};

/// Snapshot chunks: large enough to stream quickly, small enough for default gRPC limits.
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

type RpcError = RPCError<TypeConfig>;

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_stdvec(value)
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}

/// A gRPC channel to a member's first peer URL.
pub fn peer_channel(member: &Member) -> Result<Channel, tonic::transport::Error> {
    let url = member.peer_urls.first().cloned().unwrap_or_default();
    Ok(Endpoint::from_shared(url)?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .connect_lazy())
}

#[derive(Clone)]
pub struct PeerNetwork {
    metrics: Metrics,
    cluster_id: u64,
    store: StoreCopies,
}

/// Where copies of the store sent to followers come from: the store, and the directory
/// their (unlinked) files are written in.
#[derive(Clone)]
pub struct StoreCopies {
    pub store: Arc<MvccStore>,
    pub dir: PathBuf,
}

impl PeerNetwork {
    pub fn new(metrics: Metrics, cluster_id: u64, store: StoreCopies) -> Self {
        Self { metrics, cluster_id, store }
    }
}

/// Marks `request` as coming from a member of `cluster_id`; members of other clusters
/// refuse it (see `api::peer::check_peer_request`).
pub fn tag_cluster<T>(request: &mut tonic::Request<T>, cluster_id: u64) {
    if let Ok(value) = format!("{cluster_id:x}").parse() {
        request.metadata_mut().insert(crate::member::CLUSTER_ID_HEADER, value);
    }
}

/// Marks a Raft message as meant for member `target`; any other member refuses it. Two ids
/// can share a peer URL (a learner replacing a voter that lost its data, at the same
/// address): without this the new member would answer the old one's votes and appends, and
/// the leader would count them as the old voter's, a vote with a log it never had.
fn tag_target<T>(request: &mut tonic::Request<T>, target: u64) {
    if let Ok(value) = format!("{target:x}").parse() {
        request.metadata_mut().insert(crate::member::TARGET_MEMBER_HEADER, value);
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &Member) -> Self::Network {
        PeerClient {
            target,
            target_name: node.name.clone(),
            client: peer_channel(node).map(RaftPeerClient::new).map_err(|e| e.to_string()),
            metrics: self.metrics.clone(),
            cluster_id: self.cluster_id,
            store: self.store.clone(),
        }
    }
}

pub struct PeerClient {
    target: u64,
    target_name: String,
    /// A bad peer URL is reported on every call rather than panicking at construction.
    client: Result<RaftPeerClient<Channel>, String>,
    metrics: Metrics,
    cluster_id: u64,
    store: StoreCopies,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

fn unreachable(e: impl std::fmt::Display) -> RpcError {
    RPCError::Unreachable(Unreachable::new(&TransportError(e.to_string())))
}

fn network(e: impl std::fmt::Display) -> RpcError {
    RPCError::Network(NetworkError::new(&TransportError(e.to_string())))
}

fn status_error(status: tonic::Status) -> RpcError {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown => unreachable(status),
        _ => network(status),
    }
}

impl PeerClient {
    fn tag<T>(&self, request: &mut tonic::Request<T>) {
        tag_cluster(request, self.cluster_id);
        tag_target(request, self.target);
    }

    fn client(&self) -> Result<RaftPeerClient<Channel>, RpcError> {
        self.client.clone().map_err(|e| unreachable(format!("peer {}: {e}", self.target_name)))
    }

    /// Sends one request; the answer is the remote's `Result`, whose error side is the
    /// remote Raft's own failure (it is shutting down), reported as a network error.
    async fn call<Req, Resp, Fut, E>(
        &self,
        request: &Req,
        timeout: Duration,
        send: impl FnOnce(RaftPeerClient<Channel>, tonic::Request<RaftMessage>) -> Fut,
    ) -> Result<Resp, RpcError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: DeserializeOwned + std::fmt::Display,
        Fut: Future<Output = Result<tonic::Response<RaftMessage>, tonic::Status>>,
    {
        let payload = encode(request).map_err(network)?;
        let mut request = tonic::Request::new(RaftMessage { payload });
        request.set_timeout(timeout);
        self.tag(&mut request);
        let started = Instant::now();
        let reply = send(self.client()?, request).await.map_err(status_error)?;
        self.metrics.peer_round_trip(self.target, started.elapsed());
        let result: Result<Resp, E> = decode(&reply.into_inner().payload).map_err(network)?;
        result.map_err(network)
    }

    /// The snapshot's metadata and file as they go to the follower: for the member's own
    /// store, a copy of it as it is now, which has applied at least what the snapshot says,
    /// with the copy's own log id (see `state_machine`'s module comment).
    async fn snapshot_to_send(
        &self,
        vote: &Vote,
        snapshot: RaftSnapshot,
    ) -> Result<(SnapshotMeta, std::fs::File), RpcError> {
        match snapshot.snapshot {
            SnapshotData::Store => {
                let StoreCopies { store, dir } = self.store.clone();
                let copy = tokio::task::spawn_blocking(move || snapshot_of_store(&store, &dir))
                    .await
                    .map_err(network)?
                    .map_err(network)?;
                // A member that stopped leading while the copy was made may have applied a
                // newer leader's entries; a follower refuses (openraft panics on) a snapshot
                // past the vote it comes with.
                let sender = vote.leader_id().to_committed();
                if copy.meta.last_log_id.is_some_and(|id| id.leader_id > sender) {
                    return Err(network(format!(
                        "the copy of the store holds entries of a leader after this one ({:?})",
                        copy.meta.last_log_id
                    )));
                }
                tracing::info!(
                    snapshot = ?snapshot.meta.last_log_id,
                    sent = ?copy.meta.last_log_id,
                    bytes = copy.len,
                    "sending a copy of the store to {}",
                    self.target_name
                );
                Ok((copy.meta, copy.file))
            }
            SnapshotData::File(path) => Ok((snapshot.meta, std::fs::File::open(path).map_err(network)?)),
        }
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RpcError> {
        self.call::<_, _, _, String>(
            &rpc,
            option.hard_ttl(),
            |mut c, r| async move { c.append_entries(r).await },
        )
        .await
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RpcError>>, RpcError>>
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        // Pipelined replication: requests flow without waiting for each answer, and the
        // answers come back in order on the same stream.
        Box::pin(async move {
            let mut client = self.client()?;
            let messages = input
                .filter_map(|rpc| async move { encode(&rpc).ok().map(|payload| RaftMessage { payload }) });
            let mut request = tonic::Request::new(messages);
            self.tag(&mut request);
            let _ = option;
            let replies = client.stream_append(request).await.map_err(status_error)?.into_inner();
            let results = replies.map(|reply| {
                let reply = reply.map_err(status_error)?;
                let result: Result<StreamAppendResult<TypeConfig>, String> =
                    decode(&reply.payload).map_err(network)?;
                result.map_err(network)
            });
            Ok(Box::pin(results) as BoxStream<'s, _>)
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RpcError> {
        self.call::<_, _, _, String>(&rpc, option.hard_ttl(), |mut c, r| async move { c.vote(r).await }).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RpcError> {
        self.call::<_, _, _, String>(&rpc, option.hard_ttl(), |mut c, r| async move { c.pre_vote(r).await })
            .await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RpcError> {
        self.call::<_, _, _, String>(
            &req,
            option.hard_ttl(),
            |mut c, r| async move { c.transfer_leader(r).await },
        )
        .await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: RaftSnapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let as_streaming = |e: RpcError| match e {
            RPCError::Unreachable(u) => StreamingError::Unreachable(u),
            RPCError::Network(n) => StreamingError::Network(n),
            other => StreamingError::Network(NetworkError::new(&TransportError(other.to_string()))),
        };
        // Making a copy of the store takes as long as the store is large: waiting for it ends
        // when the sending is cancelled (the copy itself runs to its end and is dropped).
        let send = async {
            let (meta, file) = self.snapshot_to_send(&vote, snapshot).await?;
            let header = encode(&(vote, meta)).map_err(network)?;
            let mut client = self.client()?;
            let mut request = tonic::Request::new(snapshot_chunks(file, header));
            self.tag(&mut request);
            client.install_snapshot(request).await.map_err(status_error)
        };
        let reply = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            reply = send => reply.map_err(as_streaming)?,
        };
        let result: Result<SnapshotResponse<TypeConfig>, String> =
            decode(&reply.into_inner().payload).map_err(|e| as_streaming(network(e)))?;
        result.map_err(|e| as_streaming(network(e)))
    }
}

/// The snapshot file as chunks, the first carrying `header`, read as they are sent: a
/// snapshot is as large as the store. It is read through the descriptor it was opened with,
/// so its path being unlinked or replaced meanwhile does not change what is sent. A read
/// that fails ends the stream early; the follower then finds the file short of its checksum
/// and refuses it, and the leader sends again.
fn snapshot_chunks(file: std::fs::File, header: Vec<u8>) -> impl Stream<Item = SnapshotChunk> + use<> {
    let file = tokio::fs::File::from_std(file);
    futures::stream::unfold(Some((file, Some(header))), |state| async move {
        use tokio::io::AsyncReadExt;
        let (mut file, header) = state?;
        let mut data = Vec::with_capacity(SNAPSHOT_CHUNK_BYTES);
        if let Err(e) = (&mut file).take(SNAPSHOT_CHUNK_BYTES as u64).read_to_end(&mut data).await {
            tracing::warn!("reading a snapshot to send: {e}");
            return None;
        }
        if data.is_empty() && header.is_none() {
            return None;
        }
        let last = data.len() < SNAPSHOT_CHUNK_BYTES;
        let chunk = SnapshotChunk { header: header.unwrap_or_default(), data };
        Some((chunk, (!last).then_some((file, None))))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_of(dir: &std::path::Path, len: usize) -> (std::path::PathBuf, Vec<u8>) {
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let path = dir.join("snapshot");
        std::fs::write(&path, &bytes).expect("write");
        (path, bytes)
    }

    #[tokio::test]
    async fn a_snapshot_is_sent_as_chunks_that_make_up_the_file() {
        let dir = tempfile::tempdir().expect("dir");
        for len in [0, 10, SNAPSHOT_CHUNK_BYTES, 2 * SNAPSHOT_CHUNK_BYTES + 7] {
            let (path, bytes) = file_of(dir.path(), len);
            let chunks: Vec<SnapshotChunk> =
                snapshot_chunks(std::fs::File::open(&path).expect("open"), b"header".to_vec())
                    .collect()
                    .await;
            assert_eq!(chunks[0].header, b"header", "{len} bytes");
            assert!(chunks[1..].iter().all(|c| c.header.is_empty() && !c.data.is_empty()), "{len} bytes");
            assert!(chunks.iter().all(|c| c.data.len() <= SNAPSHOT_CHUNK_BYTES), "{len} bytes");
            let data: Vec<u8> = chunks.iter().flat_map(|c| c.data.iter().copied()).collect();
            assert_eq!(data, bytes, "{len} bytes");
        }
    }

    #[tokio::test]
    async fn a_snapshot_is_read_as_it_is_sent_through_the_descriptor_it_was_opened_with() {
        let dir = tempfile::tempdir().expect("dir");
        let (path, bytes) = file_of(dir.path(), 3 * SNAPSHOT_CHUNK_BYTES);
        let mut chunks = Box::pin(snapshot_chunks(std::fs::File::open(&path).expect("open"), Vec::new()));
        let first = chunks.next().await.expect("a first chunk");
        // Written over after the first chunk went (which snapshot files never are): the rest
        // carries the new bytes, so nothing past the first chunk was read before it was sent.
        {
            use std::io::{Seek, Write};
            let mut file = std::fs::OpenOptions::new().write(true).open(&path).expect("open");
            file.seek(std::io::SeekFrom::Start(SNAPSHOT_CHUNK_BYTES as u64)).expect("seek");
            file.write_all(&vec![b'x'; SNAPSHOT_CHUNK_BYTES]).expect("write");
        }
        // Unlinked, as a copy of the store is at once: still sent whole.
        std::fs::remove_file(&path).expect("remove");
        let rest: Vec<SnapshotChunk> = chunks.collect().await;
        assert_eq!(first.data, bytes[..SNAPSHOT_CHUNK_BYTES]);
        assert_eq!(rest.len(), 2);
        assert!(rest[0].data.iter().all(|b| *b == b'x'));
        assert_eq!(rest[1].data, bytes[2 * SNAPSHOT_CHUNK_BYTES..]);
    }
}
