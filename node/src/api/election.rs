//! etcd's Election service over the contender queue (`ownership`): the leader is the
//! contender whose key is oldest; its value is what the leader proclaims.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};

use super::errors::ApplyError;
use super::ownership;
use crate::member::Node;
use crate::proto::v3electionpb::election_server::Election;
use crate::proto::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest,
    ProclaimResponse, ResignRequest, ResignResponse,
};

/// etcd's message when a campaigner's key is deleted under it.
const KEY_LOST: &str = "election: session is expired";
/// Leader responses queued for an observer that reads slowly.
const OBSERVE_QUEUE: usize = 8;

fn not_leader() -> Status {
    Status::new(Code::FailedPrecondition, "etcdserver: election: not leader")
}

fn no_leader() -> Status {
    Status::new(Code::NotFound, "etcdserver: election: no leader")
}

pub struct ElectionService {
    node: Arc<Node>,
}

impl ElectionService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

type ObserveStream = Pin<Box<dyn Stream<Item = Result<LeaderResponse, Status>> + Send>>;

/// Streams the leader of the election under `prefix` to `responses`: once there is one,
/// and again whenever another contender leads or the leader proclaims a new value.
async fn observe(node: Arc<Node>, prefix: Vec<u8>, responses: mpsc::Sender<Result<LeaderResponse, Status>>) {
    let outcome: Result<(), Status> = async {
        // Subscribed before the first read, as in `ownership::wait_first`.
        let mut feed = node.watch_hub.subscribe();
        node.read_barrier().await?;
        let mut sent: Option<(i64, i64)> = None;
        loop {
            let update = {
                let view = node.store.read()?;
                ownership::first_in_line(&view, &prefix)?
                    .filter(|kv| sent != Some((kv.create_revision, kv.mod_revision)))
                    .map(|kv| (view.revision(), kv))
            };
            if let Some((revision, kv)) = update {
                sent = Some((kv.create_revision, kv.mod_revision));
                let response = LeaderResponse { header: Some(node.header(revision?)), kv: Some(kv) };
                if responses.send(Ok(response)).await.is_err() {
                    return Ok(());
                }
            }
            tokio::select! {
                () = responses.closed() => return Ok(()),
                changed = ownership::next_change(&mut feed, &prefix) => changed?,
            }
        }
    }
    .await;
    if let Err(status) = outcome {
        let _ = responses.send(Err(status)).await;
    }
}

#[tonic::async_trait]
impl Election for ElectionService {
    type ObserveStream = ObserveStream;

    async fn campaign(
        &self,
        request: Request<CampaignRequest>,
    ) -> Result<Response<CampaignResponse>, Status> {
        let request = request.into_inner();
        if request.name.is_empty() {
            return Err(ApplyError::EmptyKey.into());
        }
        let key = ownership::contender_key(&request.name, request.lease);
        let (claim, leave) =
            ownership::claim_guarded(&self.node, &key, request.lease, request.value.clone()).await?;
        let mut header = claim.header;
        // A campaign resumed with the same lease runs on the value it brings now.
        if !claim.created && claim.kv.value != request.value {
            let (replaced, replaced_at) = ownership::replace_value(
                &self.node,
                &key,
                claim.kv.create_revision,
                request.lease,
                request.value,
                None,
            )
            .await?;
            if !replaced {
                return Err(Status::new(Code::Unknown, KEY_LOST));
            }
            header = replaced_at;
        }
        ownership::wait_first(&self.node, &ownership::prefix(&request.name), &claim.kv, KEY_LOST).await?;
        leave.disarm();
        let leader =
            LeaderKey { name: request.name, key, rev: claim.kv.create_revision, lease: request.lease };
        Ok(Response::new(CampaignResponse { header: Some(header), leader: Some(leader) }))
    }

    async fn proclaim(
        &self,
        request: Request<ProclaimRequest>,
    ) -> Result<Response<ProclaimResponse>, Status> {
        let request = request.into_inner();
        let leader = request.leader.ok_or_else(not_leader)?;
        let (replaced, header) = ownership::replace_value(
            &self.node,
            &leader.key,
            leader.rev,
            leader.lease,
            request.value,
            Some(&ownership::prefix(&leader.name)),
        )
        .await?;
        if !replaced {
            return Err(not_leader());
        }
        Ok(Response::new(ProclaimResponse { header: Some(header) }))
    }

    async fn leader(&self, request: Request<LeaderRequest>) -> Result<Response<LeaderResponse>, Status> {
        let request = request.into_inner();
        self.node.read_barrier().await?;
        let view = self.node.store.read()?;
        let kv = ownership::first_in_line(&view, &ownership::prefix(&request.name))?.ok_or_else(no_leader)?;
        Ok(Response::new(LeaderResponse { header: Some(self.node.header(view.revision()?)), kv: Some(kv) }))
    }

    async fn observe(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        let request = request.into_inner();
        let (responses, stream) = mpsc::channel(OBSERVE_QUEUE);
        tokio::spawn(observe(self.node.clone(), ownership::prefix(&request.name), responses));
        Ok(Response::new(Box::pin(ReceiverStream::new(stream))))
    }

    async fn resign(&self, request: Request<ResignRequest>) -> Result<Response<ResignResponse>, Status> {
        let request = request.into_inner();
        let leader = request.leader.ok_or_else(not_leader)?;
        // As etcd does, resigning leadership one no longer holds succeeds and changes nothing.
        let header = ownership::release(&self.node, &leader.key, leader.rev).await?;
        Ok(Response::new(ResignResponse { header: Some(header) }))
    }
}
