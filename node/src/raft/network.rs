//! The peer transport, client side: openraft's messages to other members over gRPC.
//!
//! Connections are lazy and tonic reconnects them with backoff; openraft backs off from
//! members it finds unreachable. Every call carries openraft's deadline for it.

use std::future::Future;
use std::io::Read;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use openraft::base::{BoxFuture, BoxStream};
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, Endpoint};

use super::state_machine::{RaftSnapshot, SnapshotFile};
use super::types::{Member, TypeConfig, Vote};
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
}

impl PeerNetwork {
    pub fn new(metrics: Metrics, cluster_id: u64) -> Self {
        Self { metrics, cluster_id }
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
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotFile;

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
        let header = encode(&(vote, snapshot.meta.clone())).map_err(|e| as_streaming(network(e)))?;
        let chunks =
            snapshot_chunks(snapshot.snapshot.path.clone(), header).map_err(|e| as_streaming(network(e)))?;
        let mut client = self.client().map_err(as_streaming)?;
        let mut request = tonic::Request::new(tokio_stream::iter(chunks));
        self.tag(&mut request);
        let send = async move { client.install_snapshot(request).await };
        let reply = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            reply = send => reply.map_err(|s| as_streaming(status_error(s)))?,
        };
        let result: Result<SnapshotResponse<TypeConfig>, String> =
            decode(&reply.into_inner().payload).map_err(|e| as_streaming(network(e)))?;
        result.map_err(|e| as_streaming(network(e)))
    }
}

/// The snapshot file as chunks, the first carrying `header`. Read whole before sending:
/// snapshots of this store are small next to memory, and a file that changes under a
/// slow stream would corrupt the follower's copy.
fn snapshot_chunks(path: std::path::PathBuf, header: Vec<u8>) -> std::io::Result<Vec<SnapshotChunk>> {
    let mut file = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut chunks = Vec::new();
    let mut header = Some(header);
    loop {
        let mut data = Vec::with_capacity(SNAPSHOT_CHUNK_BYTES);
        (&mut file).take(SNAPSHOT_CHUNK_BYTES as u64).read_to_end(&mut data)?;
        if data.is_empty() && header.is_none() {
            return Ok(chunks);
        }
        let last = data.len() < SNAPSHOT_CHUNK_BYTES;
        chunks.push(SnapshotChunk { header: header.take().unwrap_or_default(), data });
        if last {
            return Ok(chunks);
        }
    }
}
