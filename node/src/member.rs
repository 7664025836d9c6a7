//! A running member: its identity, its Raft instance and store, and the requests only the
//! leader can serve (writes, read indexes, membership changes), forwarded to the leader
//! over the peer port when this member is not it.

use openraft::Instant as _;
use openraft::async_runtime::WatchReceiver;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::ChangeMembers;
use openraft::errors::{ChangeMembershipError, ClientWriteError, LinearizableReadError, RaftError};
use openraft::raft::ReadPolicy;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

use crate::api::errors::ServerError;
use crate::kv::MvccStore;
use crate::kv::watch::WatchHub;
use crate::metrics::{Metrics, WriteStage};
use crate::proto::etcdserverpb::ResponseHeader;
use crate::proto::raft::RaftMessage;
use crate::proto::raft::raft_peer_client::RaftPeerClient;
use crate::raft::network::{decode, encode, peer_channel, tag_cluster};
use crate::raft::types::{Applied, Command, Member, Raft};

/// How long waiting on the leader for a read index's entries, or for a membership change in
/// flight, may take; and a peer's answer to which members it knows.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a membership change is tried when another one is in flight.
const MEMBERSHIP_ATTEMPTS: usize = 5;
/// A learner may be promoted once it is this close to the leader's log.
pub const LEARNER_CATCH_UP_ENTRIES: u64 = 1000;

/// Who this member is, written into the data directory before Raft starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub name: String,
    pub member_id: u64,
    pub cluster_id: u64,
    /// A founder of a new cluster: the members it bootstraps Raft with, kept until a start
    /// finds Raft's own state on disk. A member that crashed after saving its identity and
    /// before Raft had its first membership bootstraps on the next start instead of waiting
    /// forever for a leader (a one-member cluster, or every founder crashed alike).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub founding: Option<BTreeMap<u64, Member>>,
}

impl Identity {
    fn file(dir: &Path) -> crate::storage::hard_state::HardStateFile {
        crate::storage::hard_state::HardStateFile::new(dir.join("identity.json"))
    }

    pub fn load(dir: &Path) -> std::io::Result<Option<Self>> {
        match Self::file(dir).load()? {
            Some(json) => serde_json::from_slice(&json)
                .map(Some)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            None => Ok(None),
        }
    }

    /// JSON (readable with `head -c -4`) followed by its checksum, replaced atomically.
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        Self::file(dir).save(&json)
    }
}

fn hash_u64(parts: &[&[u8]]) -> u64 {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    // Zero means "no member" in etcd's API.
    u64::from_be_bytes(first).max(1)
}

/// A member's id, as etcd derives it: from its peer URLs and the cluster token, so every
/// member of a new cluster computes the same ids from `--initial-cluster`.
pub fn member_id_for(peer_urls: &[String], token: &str) -> u64 {
    let mut urls = peer_urls.to_vec();
    urls.sort();
    hash_u64(&[urls.join(",").as_bytes(), token.as_bytes()])
}

/// The cluster id of a new cluster: from its members' ids and the token.
pub fn cluster_id_for(member_ids: &[u64], token: &str) -> u64 {
    let mut ids = member_ids.to_vec();
    ids.sort_unstable();
    let joined: Vec<u8> = ids.iter().flat_map(|id| id.to_be_bytes()).collect();
    hash_u64(&[&joined, token.as_bytes()])
}

/// What a member asks of the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForwardRequest {
    Write(Command),
    /// The leader's commit index once it has confirmed it is still the leader.
    ReadIndex,
    AddMember {
        peer_urls: Vec<String>,
        learner: bool,
    },
    PromoteMember(u64),
    RemoveMember(u64),
    UpdateMember {
        id: u64,
        peer_urls: Vec<String>,
    },
    PublishClientUrls {
        id: u64,
        name: String,
        client_urls: Vec<String>,
    },
    TransferLeader(u64),
    /// Renews a lease; the leader answers its granted TTL, or 0 when it does not exist.
    LeaseKeepAlive(i64),
    /// A lease's remaining and granted TTL and its keys, as the leader knows them.
    LeaseTimeToLive(i64),
    /// The cluster id and members as this member knows them; any member answers, leader or
    /// not (a member started with `--initial-cluster-state existing` asks for its id).
    Members,
    // Appended after the variants above: requests cross the peer port encoded by position,
    // so members of an older build still decode the ones they know.
    /// Replaces the voter set in one joint-consensus step (admin.proto's ChangeVoters).
    ChangeVoters(BTreeSet<u64>),
    /// As `Members`, with each member's role: a joining member must know whether the id it
    /// is given is a voter (see `server::join_existing`). Any member answers.
    Roster,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForwardResponse {
    Applied(Applied),
    ReadIndex(u64),
    MemberId(u64),
    Done,
    Members {
        cluster_id: u64,
        members: Vec<(u64, Member)>,
    },
    LeaseTtl(i64),
    /// `None` when the lease does not exist.
    LeaseTimeToLive(Option<LeaseStatus>),
    /// The membership a membership change committed.
    Membership {
        voters: Vec<u64>,
        learners: Vec<u64>,
    },
    Roster {
        cluster_id: u64,
        members: Vec<MemberInfo>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseStatus {
    pub remaining: i64,
    pub granted: i64,
    pub keys: Vec<Vec<u8>>,
}

/// Asks `peer` for the cluster id and the members it knows, with their roles.
pub async fn ask_roster(peer: &Member) -> Result<(u64, Vec<MemberInfo>), ServerError> {
    let channel = peer_channel(peer).map_err(|e| ServerError::Internal(e.to_string()))?;
    match call_forward(RaftPeerClient::new(channel), None, &ForwardRequest::Roster, FORWARD_TIMEOUT).await? {
        ForwardResponse::Roster { cluster_id, members } => Ok((cluster_id, members)),
        other => Err(ServerError::Internal(format!("unexpected answer to a member list: {other:?}"))),
    }
}

/// etcd's request timeout for a member whose election timeout is `election`: 5 s and two
/// election timeouts, room for a leader change on the way. A large request, such as a
/// DeleteRange of 60,000 keys on a 2 GB store, may take the leader over 5 s to apply.
fn request_timeout(election: Duration) -> Duration {
    Duration::from_secs(5) + 2 * election
}

/// gRPC metadata key carrying the sender's cluster id on every peer request.
pub const CLUSTER_ID_HEADER: &str = "x-consensus-cluster-id";
/// gRPC metadata key carrying the member id a Raft message is meant for.
pub const TARGET_MEMBER_HEADER: &str = "x-consensus-target-member";

async fn call_forward(
    mut client: RaftPeerClient<Channel>,
    cluster_id: Option<u64>,
    request: &ForwardRequest,
    timeout: Duration,
) -> Result<ForwardResponse, ServerError> {
    let payload = encode(request).map_err(|e| ServerError::Internal(e.to_string()))?;
    let mut call = tonic::Request::new(RaftMessage { payload });
    call.set_timeout(timeout);
    if let Some(id) = cluster_id {
        tag_cluster(&mut call, id);
    }
    let reply = client.forward(call).await.map_err(forward_failure)?;
    decode::<Result<ForwardResponse, ServerError>>(&reply.into_inner().payload)
        .map_err(|e| ServerError::Internal(e.to_string()))?
}

/// What a client is told when a forwarded request fails on the way to the leader. Only a
/// deadline is etcd's timeout; anything else says what failed rather than claiming a leader
/// change nobody saw.
fn forward_failure(status: tonic::Status) -> ServerError {
    match status.code() {
        tonic::Code::DeadlineExceeded => ServerError::Timeout,
        // tonic ends a call past its grpc-timeout with Cancelled "Timeout expired"
        // (`TimeoutExpired`): the leader did not answer within the request timeout, a timeout as
        // etcd says it. Under `etcdctl check perf --load=l` this is what "leader changed" was.
        tonic::Code::Cancelled if status.message() == "Timeout expired" => ServerError::Timeout,
        code => {
            let cause = std::error::Error::source(&status).map(|s| format!(" ({s})")).unwrap_or_default();
            ServerError::ForwardFailed(format!("{code:?}: {}{cause}", status.message()))
        }
    }
}

/// One Raft member as the Cluster API reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub id: u64,
    pub member: Member,
    pub is_learner: bool,
}

type ReadIndexReply = tokio::sync::oneshot::Sender<Result<u64, ServerError>>;

pub struct Node {
    pub identity: Identity,
    pub raft: Raft,
    pub store: Arc<MvccStore>,
    pub metrics: Metrics,
    pub db_path: PathBuf,
    pub leases: crate::lease::LeaseClock,
    /// Committed events, for the watch streams this member serves.
    pub watch_hub: WatchHub,
    pub quota_bytes: u64,
    /// How long a request forwarded to the leader may take.
    request_timeout: Duration,
    leader_clients: Mutex<HashMap<u64, RaftPeerClient<Channel>>>,
    read_index_requests: tokio::sync::mpsc::UnboundedSender<ReadIndexReply>,
    recent_db_size: Recent,
}

/// How old the size `Node::recent_db_size` answers may be.
const DB_SIZE_REFRESH: Duration = Duration::from_millis(10);

/// A value read again only once the last reading is `max_age` old.
struct Recent {
    max_age: Duration,
    last: Mutex<Option<(std::time::Instant, u64)>>,
}

impl Recent {
    fn new(max_age: Duration) -> Self {
        Self { max_age, last: Mutex::new(None) }
    }

    fn get(&self, now: std::time::Instant, read: impl FnOnce() -> u64) -> u64 {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match *last {
            Some((at, value)) if now.saturating_duration_since(at) < self.max_age => value,
            _ => {
                let value = read();
                *last = Some((now, value));
                value
            }
        }
    }
}

/// Serves read index requests in rounds: every request queued while a round was in flight
/// joins the next one, so each is answered by a round that started after it arrived (which
/// keeps reads linearizable) and concurrent reads share one heartbeat round.
async fn serve_read_indexes(
    raft: Raft,
    last_data_index: Arc<AtomicU64>,
    mut requests: tokio::sync::mpsc::UnboundedReceiver<ReadIndexReply>,
) {
    while let Some(first) = requests.recv().await {
        let mut waiting = vec![first];
        while let Ok(next) = requests.try_recv() {
            waiting.push(next);
        }
        let result = confirm_read_index(&raft, &last_data_index).await;
        for reply in waiting {
            let _ = reply.send(result.clone());
        }
    }
}

/// ReadIndex (Raft thesis 6.4): note the commit index when the round starts, confirm that
/// this member still leads, and return an index a read may be served at once the member
/// that received it has applied up to it.
///
/// Leadership is confirmed by a heartbeat round that starts after the reads arrived and that a
/// quorum answers (openraft's `ReadPolicy::ReadIndex`: a heartbeat at once, never a recorded
/// answer). Nothing is written: reads used to commit a blank entry instead, which cost every
/// round an fsync on a quorum.
///
/// The index returned is that of the last entry that changed data or membership, when the
/// leader had applied everything up to the read index: blank entries change nothing a read
/// can see, and followers learn of their commit only with the next message from the leader,
/// so waiting for them would cost a heartbeat interval per read. Every write acknowledged
/// before the round started is at or below that index.
async fn confirm_read_index(raft: &Raft, last_data_index: &AtomicU64) -> Result<u64, ServerError> {
    let applied = raft.metrics().borrow_watched().last_applied.map_or(0, |a| a.index);
    let data = last_data_index.load(Ordering::SeqCst);
    match raft.get_read_linearizer(ReadPolicy::ReadIndex).await {
        Ok(linearizer) => {
            let read_index = linearizer.read_log_id().index();
            Ok(if applied >= read_index { data.min(read_index) } else { read_index })
        }
        Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(_))) => {
            Err(ServerError::LeaderChanged)
        }
        // No quorum answered within the leader lease: the leadership cannot be confirmed.
        Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(_))) => Err(ServerError::Timeout),
        Err(RaftError::Fatal(_)) => Err(ServerError::Stopped),
    }
}

fn membership_answer(membership: &crate::raft::types::Membership) -> ForwardResponse {
    ForwardResponse::Membership {
        voters: membership.voter_ids().collect(),
        learners: membership.learner_ids().collect(),
    }
}

fn membership_in_progress(
    e: &RaftError<crate::raft::types::TypeConfig, ClientWriteError<crate::raft::types::TypeConfig>>,
) -> bool {
    matches!(
        e,
        RaftError::APIError(ClientWriteError::ChangeMembershipError(ChangeMembershipError::InProgress(_)))
    )
}

fn internal(e: impl std::fmt::Display) -> ServerError {
    ServerError::Internal(e.to_string())
}

fn raft_write_error<E: std::fmt::Display>(e: RaftError<crate::raft::types::TypeConfig, E>) -> ServerError {
    match e {
        RaftError::Fatal(_) => ServerError::Stopped,
        RaftError::APIError(e) => ServerError::Internal(e.to_string()),
    }
}

/// What a member is made of, assembled by `server::run`.
pub struct NodeParts {
    pub identity: Identity,
    pub raft: Raft,
    pub store: Arc<MvccStore>,
    pub metrics: Metrics,
    pub db_path: PathBuf,
    /// Kept by the state machine: see `StateMachine::new`.
    pub last_data_index: Arc<AtomicU64>,
    pub leases: crate::lease::LeaseClock,
    pub watch_hub: WatchHub,
    /// `--quota-backend-bytes`: see `api::quota`.
    pub quota_bytes: u64,
    /// `--election-timeout`, which sets how long a forwarded request may take.
    pub election_timeout: Duration,
}

impl Node {
    /// Must be called inside a Tokio runtime: it starts the read index rounds.
    pub fn new(parts: NodeParts) -> Self {
        let NodeParts {
            identity,
            raft,
            store,
            metrics,
            db_path,
            last_data_index,
            leases,
            watch_hub,
            quota_bytes,
            election_timeout,
        } = parts;
        let request_timeout = request_timeout(election_timeout);
        let (read_index_requests, receiver) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(serve_read_indexes(raft.clone(), last_data_index, receiver));
        Self {
            identity,
            raft,
            store,
            metrics,
            db_path,
            leases,
            watch_hub,
            quota_bytes,
            request_timeout,
            leader_clients: Mutex::new(HashMap::new()),
            read_index_requests,
            recent_db_size: Recent::new(DB_SIZE_REFRESH),
        }
    }

    /// The disk space the store's file takes (etcd's `dbSize`, "physically allocated"): its
    /// allocated blocks, not its length. redb doubles the file's length each time it grows
    /// (up to 4 GiB) and writes the new half only as it uses it, so the length overstated the
    /// store up to twice, and the quota, checked against it, refused writes at half the data
    /// etcd takes: etcd reports and checks the pages its file holds, not its length.
    pub fn db_size(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.db_path).map_or(0, |m| m.len().min(m.blocks() * 512))
    }

    /// `db_size` as read at most `DB_SIZE_REFRESH` ago, for what asks on every write (the
    /// quota check) or every applied batch (the size metric): a `statx` each took 1 % of
    /// a loaded member's CPU. The file's blocks change only when redb writes pages, at its
    /// durable commits a second apart (etcd's size too changes only with its backend's
    /// commits), so a size read a moment ago is as true as one read now.
    pub fn recent_db_size(&self) -> u64 {
        self.recent_db_size.get(std::time::Instant::now(), || self.db_size())
    }

    /// The header etcd puts on every response, at the store's current revision.
    pub fn current_header(&self) -> Result<ResponseHeader, crate::kv::KvError> {
        Ok(self.header(self.store.read()?.revision()?))
    }

    /// The header etcd puts on every response.
    pub fn header(&self, revision: i64) -> ResponseHeader {
        // Only the term is needed: copying it out avoids cloning all of Raft's metrics on
        // every response.
        let raft_term = self.raft.metrics().borrow_watched().current_term;
        ResponseHeader {
            cluster_id: self.identity.cluster_id,
            member_id: self.identity.member_id,
            revision,
            raft_term,
        }
    }

    /// The term this member leads in, if it is the leader.
    pub fn leading_term(&self) -> Option<u64> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow_watched();
        (metrics.current_leader == Some(self.identity.member_id)).then_some(metrics.current_term)
    }

    pub fn current_leader(&self) -> Option<u64> {
        self.raft.metrics().borrow_watched().current_leader
    }

    pub fn members(&self) -> Vec<MemberInfo> {
        let metrics = self.raft.metrics().borrow_watched().clone();
        let membership = metrics.membership_config.membership();
        let learners: BTreeSet<u64> = membership.learner_ids().collect();
        membership
            .nodes()
            .map(|(id, member)| MemberInfo {
                id: *id,
                member: member.clone(),
                is_learner: learners.contains(id),
            })
            .collect()
    }

    /// The voters MemberList reports. While a joint-consensus change is between its two
    /// configurations (milliseconds), those of the configuration it is changing to, which
    /// the cluster has already decided on: etcd has no joint state to show, and the union
    /// would show a replacement of one voter (three to three) as four voters. Everything
    /// that decides on votes (a lost voter's refusal to start empty, leadership transfer)
    /// goes by `members`, where a member of either configuration votes.
    pub fn reported_voters(&self) -> BTreeSet<u64> {
        let metrics = self.raft.metrics().borrow_watched().clone();
        let membership = metrics.membership_config.membership();
        membership.get_joint_config().last().cloned().unwrap_or_else(|| membership.voter_ids().collect())
    }

    /// Proposes `command` and returns its outcome once applied, wherever the leader is.
    pub async fn write(&self, command: Command) -> Result<Applied, ServerError> {
        self.metrics.proposal_started();
        let started = std::time::Instant::now();
        let result = match self.on_leader(ForwardRequest::Write(command)).await {
            Ok(ForwardResponse::Applied(applied)) => Ok(applied),
            Ok(other) => Err(ServerError::Internal(format!("unexpected answer to a write: {other:?}"))),
            Err(e) => Err(e),
        };
        self.metrics.proposal_finished(result.is_err());
        self.metrics.write_stage(WriteStage::Request, started.elapsed());
        result
    }

    /// Returns once this member has applied everything committed before the call: a read
    /// served after it is linearizable (ReadIndex, through the leader).
    pub async fn read_barrier(&self) -> Result<(), ServerError> {
        if crate::failpoint::eval("read-index").is_err() {
            // The chaos checker's own test: a bug planted on purpose, reads served from
            // whatever this member has applied, leadership never confirmed.
            return Ok(());
        }
        let index = match self.on_leader(ForwardRequest::ReadIndex).await? {
            ForwardResponse::ReadIndex(index) => index,
            other => {
                return Err(ServerError::Internal(format!("unexpected answer to a read index: {other:?}")));
            }
        };
        self.raft
            .wait(Some(FORWARD_TIMEOUT))
            .applied_index_at_least(Some(index), "read index")
            .await
            .map(|_| ())
            .map_err(|_| ServerError::Timeout)
    }

    /// Runs `request` here when this member leads, otherwise on the leader.
    pub async fn on_leader(&self, request: ForwardRequest) -> Result<ForwardResponse, ServerError> {
        let leader = self.current_leader().ok_or(ServerError::NoLeader)?;
        if leader == self.identity.member_id {
            return self.execute_as_leader(request).await;
        }
        self.forward(leader, &request).await
    }

    async fn forward(&self, leader: u64, request: &ForwardRequest) -> Result<ForwardResponse, ServerError> {
        call_forward(
            self.leader_client(leader)?,
            Some(self.identity.cluster_id),
            request,
            self.request_timeout,
        )
        .await
    }

    /// The cluster id and members, as this member knows them.
    pub fn known_members(&self) -> ForwardResponse {
        ForwardResponse::Members {
            cluster_id: self.identity.cluster_id,
            members: self.members().into_iter().map(|m| (m.id, m.member)).collect(),
        }
    }

    /// The cluster id and members with their roles, as this member knows them.
    pub fn known_roster(&self) -> ForwardResponse {
        ForwardResponse::Roster { cluster_id: self.identity.cluster_id, members: self.members() }
    }

    fn leader_client(&self, leader: u64) -> Result<RaftPeerClient<Channel>, ServerError> {
        let mut clients = self.leader_clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(client) = clients.get(&leader) {
            return Ok(client.clone());
        }
        let member = self.members().into_iter().find(|m| m.id == leader).ok_or(ServerError::NoLeader)?.member;
        let client =
            RaftPeerClient::new(peer_channel(&member).map_err(|e| ServerError::Internal(e.to_string()))?);
        clients.insert(leader, client.clone());
        Ok(client)
    }

    /// Serves a request that needs the leader; fails with `LeaderChanged` when this member
    /// is not (or no longer) it, and the caller retries against the new leader.
    pub async fn execute_as_leader(&self, request: ForwardRequest) -> Result<ForwardResponse, ServerError> {
        let not_leader = |e: &ClientWriteError<_>| matches!(e, ClientWriteError::ForwardToLeader(_));
        match request {
            ForwardRequest::Write(command) => {
                let proposed = std::time::Instant::now();
                let written = self.raft.client_write(command).await;
                self.metrics.write_stage(WriteStage::Propose, proposed.elapsed());
                match written {
                    Ok(response) => Ok(ForwardResponse::Applied(response.data)),
                    Err(RaftError::APIError(e)) if not_leader(&e) => Err(ServerError::LeaderChanged),
                    Err(e) => Err(raft_write_error(e)),
                }
            }
            ForwardRequest::ReadIndex => {
                let (reply, answer) = tokio::sync::oneshot::channel();
                self.read_index_requests.send(reply).map_err(|_| ServerError::Stopped)?;
                Ok(ForwardResponse::ReadIndex(answer.await.map_err(|_| ServerError::Stopped)??))
            }
            ForwardRequest::AddMember { peer_urls, learner } => self.add_member(peer_urls, learner).await,
            ForwardRequest::PromoteMember(id) => self.promote(id).await,
            ForwardRequest::RemoveMember(id) => self.remove(id).await,
            ForwardRequest::UpdateMember { id, peer_urls } => {
                let mut member = self.member(id)?.member;
                member.peer_urls = peer_urls;
                self.change(ChangeMembers::SetNodes(BTreeMap::from([(id, member)]))).await
            }
            ForwardRequest::PublishClientUrls { id, name, client_urls } => {
                let mut member = self.member(id)?.member;
                member.name = name;
                member.client_urls = client_urls;
                self.change(ChangeMembers::SetNodes(BTreeMap::from([(id, member)]))).await
            }
            ForwardRequest::TransferLeader(to) => {
                let target = self.member(to)?;
                if target.is_learner {
                    return Err(ServerError::BadLeaderTransferee);
                }
                self.raft.trigger().transfer_leader(to).await.map_err(|_| ServerError::Stopped)?;
                Ok(ForwardResponse::Done)
            }
            ForwardRequest::Members => Ok(self.known_members()),
            ForwardRequest::Roster => Ok(self.known_roster()),
            ForwardRequest::ChangeVoters(voters) => self.change_voters(voters).await,
            ForwardRequest::LeaseKeepAlive(id) => {
                let term = self.leading_term().ok_or(ServerError::LeaderChanged)?;
                let now = tokio::time::Instant::now();
                // 0 (etcd's answer for a lease that is gone) also for one that expired.
                let ttl = self.granted_ttl(id)?.filter(|ttl| self.leases.renew(term, id, *ttl, now));
                Ok(ForwardResponse::LeaseTtl(ttl.unwrap_or(0)))
            }
            ForwardRequest::LeaseTimeToLive(id) => {
                let term = self.leading_term().ok_or(ServerError::LeaderChanged)?;
                let Some(granted) = self.granted_ttl(id)? else {
                    return Ok(ForwardResponse::LeaseTimeToLive(None));
                };
                let keys = self.store.read().and_then(|view| view.lease_keys(id)).map_err(internal)?;
                let remaining = self.leases.remaining(term, id, granted, tokio::time::Instant::now());
                Ok(ForwardResponse::LeaseTimeToLive(Some(LeaseStatus { remaining, granted, keys })))
            }
        }
    }

    fn granted_ttl(&self, id: i64) -> Result<Option<i64>, ServerError> {
        self.store.read().and_then(|view| view.lease_ttl(id)).map_err(internal)
    }

    fn member(&self, id: u64) -> Result<MemberInfo, ServerError> {
        self.members().into_iter().find(|m| m.id == id).ok_or(ServerError::MemberNotFound)
    }

    async fn change(&self, change: ChangeMembers<u64, Member>) -> Result<ForwardResponse, ServerError> {
        for _ in 0..MEMBERSHIP_ATTEMPTS {
            match self.raft.change_membership(change.clone(), true).await {
                Ok(_) => return Ok(ForwardResponse::Done),
                Err(e) if membership_in_progress(&e) => self.membership_settled().await,
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                    return Err(ServerError::LeaderChanged);
                }
                Err(e) => return Err(raft_write_error(e)),
            }
        }
        Err(ServerError::Timeout)
    }

    /// Waits until the last membership change has committed. openraft takes one change at a
    /// time, and members publishing their names change the membership too, so an
    /// operator's change can meet one in flight.
    async fn membership_settled(&self) {
        let _ = self
            .raft
            .wait(Some(FORWARD_TIMEOUT))
            .metrics(
                |m| m.membership_config.log_id() == m.committed_membership_config.log_id(),
                "membership committed",
            )
            .await;
    }

    async fn add_member(
        &self,
        peer_urls: Vec<String>,
        learner: bool,
    ) -> Result<ForwardResponse, ServerError> {
        let members = self.members();
        let sharing: Vec<&MemberInfo> =
            members.iter().filter(|m| m.member.peer_urls.iter().any(|u| peer_urls.contains(u))).collect();
        // A peer URL names one running member. The exception is a learner taking the place
        // of voters that no longer answer there (a voter whose volume was wiped cannot run
        // again under its id): added first, it catches up and then replaces the old voter in
        // one joint change, so the voter count never passes through an even number. Raft
        // messages carry their target id, so the new member never answers for the old one.
        let replaces_silent_voters =
            learner && sharing.iter().all(|m| !m.is_learner && !self.healthy_voter(m.id));
        if !sharing.is_empty() && !replaces_silent_voters {
            return Err(ServerError::PeerUrlExists);
        }
        // The log index makes the id new even for peer URLs a removed member once had, so a
        // replacement never inherits the identity (and Raft state) of its predecessor.
        let last_index = self.raft.metrics().borrow_watched().last_log_index.unwrap_or(0);
        let id = member_id_for(&peer_urls, &format!("{:x}/{last_index}", self.identity.cluster_id));
        let member = Member { name: String::new(), peer_urls, client_urls: Vec::new() };
        if !learner {
            // etcd's strict reconfiguration check: the voters that are up must still form
            // a quorum of the larger voter set, or the cluster stops until the new one starts.
            let voters = members.iter().filter(|m| !m.is_learner).count();
            let started = self.healthy_voters();
            if started < voters.div_ceil(2) + 1 {
                return Err(ServerError::NotEnoughStartedMembers);
            }
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.raft.add_learner(id, member.clone(), false).await {
                Ok(_) => break,
                Err(e) if membership_in_progress(&e) && attempts < MEMBERSHIP_ATTEMPTS => {
                    self.membership_settled().await;
                }
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                    return Err(ServerError::LeaderChanged);
                }
                Err(e) => return Err(raft_write_error(e)),
            }
        }
        if !learner {
            self.change(ChangeMembers::AddVoterIds(BTreeSet::from([id]))).await?;
        }
        Ok(ForwardResponse::MemberId(id))
    }

    /// Voters the leader has heard from recently (their replication is progressing).
    fn healthy_voters(&self) -> usize {
        let voters: Vec<u64> =
            self.raft.metrics().borrow_watched().membership_config.membership().voter_ids().collect();
        voters.into_iter().filter(|id| self.healthy_voter(*id)).count()
    }

    async fn promote(&self, id: u64) -> Result<ForwardResponse, ServerError> {
        let target = self.member(id)?;
        if !target.is_learner {
            return Err(ServerError::MemberNotLearner);
        }
        self.check_caught_up(id)?;
        self.change(ChangeMembers::AddVoterIds(BTreeSet::from([id]))).await
    }

    /// A learner may vote once it is close to the leader's log: a voter far behind would
    /// leave the cluster waiting for it in every quorum it is needed for.
    fn check_caught_up(&self, id: u64) -> Result<(), ServerError> {
        let metrics = self.raft.metrics().borrow_watched().clone();
        let leader_last = metrics.last_log_index.unwrap_or(0);
        let matched = metrics
            .replication
            .as_ref()
            .and_then(|r| r.get(&id).cloned().flatten())
            .map_or(0, |log_id| log_id.index);
        if leader_last.saturating_sub(matched) > LEARNER_CATCH_UP_ENTRIES || matched == 0 {
            return Err(ServerError::LearnerNotReady);
        }
        Ok(())
    }

    /// ChangeVoters on the leader: the checks of admin.proto, then one `ReplaceAllVoters`
    /// (a joint configuration, then the new one), keeping the voters left out as learners.
    async fn change_voters(&self, voters: BTreeSet<u64>) -> Result<ForwardResponse, ServerError> {
        for _ in 0..MEMBERSHIP_ATTEMPTS {
            if let Some(answer) = self.try_change_voters(&voters).await? {
                return Ok(answer);
            }
            self.membership_settled().await;
        }
        Err(ServerError::Timeout)
    }

    /// `None` when another membership change came first: the checks must be made again
    /// against the membership it leaves.
    async fn try_change_voters(
        &self,
        voters: &BTreeSet<u64>,
    ) -> Result<Option<ForwardResponse>, ServerError> {
        if voters.is_empty() || voters.len().is_multiple_of(2) {
            return Err(ServerError::VoterSetNotOdd(voters.len()));
        }
        let metrics = self.raft.metrics().borrow_watched().clone();
        if metrics.current_leader != Some(self.identity.member_id) {
            return Err(ServerError::LeaderChanged);
        }
        // The leader cannot take itself out in the same step: it would lead a configuration
        // it has no vote in until it steps down, and clients would see it leave mid-change.
        if !voters.contains(&self.identity.member_id) {
            return Err(ServerError::LeaderLeftOut(self.identity.member_id));
        }
        let stored = metrics.membership_config.clone();
        let membership = stored.membership();
        let current: BTreeSet<u64> = membership.voter_ids().collect();
        for id in voters {
            if membership.get_node(id).is_none() {
                return Err(ServerError::VoterNotMember(*id));
            }
            if !current.contains(id) {
                self.check_caught_up(*id)?;
            }
        }
        if current == *voters && membership.get_joint_config().len() == 1 {
            return Ok(Some(membership_answer(membership)));
        }
        // etcd's strict reconfiguration check, for the new set: the members of it that are
        // up must form its quorum, or the cluster stops when the change commits.
        let healthy = voters.iter().filter(|id| self.healthy_voter(**id)).count();
        if healthy < voters.len() / 2 + 1 {
            return Err(ServerError::NotEnoughStartedMembers);
        }
        // The checks above read this membership; a change committed since would make them
        // stale, so the change is proposed only while it is still the effective one.
        let unchanged =
            openraft::Precondition::LastMembershipLogId { last_membership_log_id: *stored.log_id() };
        let change = ChangeMembers::ReplaceAllVoters(voters.clone());
        match self.raft.change_membership_if(change, true, [unchanged]).await {
            Ok(response) => match response.membership {
                Some(membership) => Ok(Some(membership_answer(&membership))),
                None => Err(ServerError::Internal("a membership change committed no membership".into())),
            },
            Err(RaftError::APIError(ClientWriteError::PreconditionFailed(_))) => Ok(None),
            Err(e) if membership_in_progress(&e) => Ok(None),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Err(ServerError::LeaderChanged),
            Err(e) => Err(raft_write_error(e)),
        }
    }

    async fn remove(&self, id: u64) -> Result<ForwardResponse, ServerError> {
        let target = self.member(id)?;
        if !target.is_learner {
            let voters = self.members().iter().filter(|m| !m.is_learner).count();
            let healthy = self.healthy_voters() - usize::from(self.healthy_voter(id));
            if voters <= 1 || healthy < (voters - 1) / 2 + 1 {
                return Err(ServerError::NotEnoughStartedMembers);
            }
            self.change(ChangeMembers::RemoveVoters(BTreeSet::from([id]))).await?;
        }
        let _ = self.change(ChangeMembers::RemoveNodes(BTreeSet::from([id]))).await?;
        Ok(ForwardResponse::Done)
    }

    fn healthy_voter(&self, id: u64) -> bool {
        if id == self.identity.member_id {
            return true;
        }
        let metrics = self.raft.metrics().borrow_watched().clone();
        metrics
            .heartbeat
            .as_ref()
            .and_then(|beats| beats.get(&id).cloned().flatten())
            .is_some_and(|t| t.elapsed() < Duration::from_secs(5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recent_value_is_read_again_once_it_is_as_old_as_allowed() {
        let recent = Recent::new(Duration::from_millis(10));
        let start = std::time::Instant::now();
        assert_eq!(recent.get(start, || 1), 1);
        assert_eq!(recent.get(start + Duration::from_millis(9), || 2), 1, "read again too soon");
        assert_eq!(recent.get(start + Duration::from_millis(10), || 3), 3, "not read again");
        assert_eq!(recent.get(start + Duration::from_millis(15), || 4), 3);
    }

    #[test]
    fn a_forwarded_request_may_take_etcds_request_timeout() {
        // etcd: ReqTimeout() = 5 s + 2 * election timeout; 7 s at its default of 1 s.
        assert_eq!(request_timeout(Duration::from_millis(1000)), Duration::from_secs(7));
        assert_eq!(request_timeout(Duration::from_millis(500)), Duration::from_secs(6));
    }

    #[test]
    fn a_forward_that_fails_on_the_way_says_what_failed_and_only_a_deadline_is_a_timeout() {
        assert_eq!(forward_failure(tonic::Status::deadline_exceeded("late")), ServerError::Timeout);
        // What tonic's server answers past the forward's grpc-timeout.
        assert_eq!(forward_failure(tonic::Status::cancelled("Timeout expired")), ServerError::Timeout);
        assert!(matches!(
            forward_failure(tonic::Status::cancelled("dropped")),
            ServerError::ForwardFailed(_)
        ));
        let refused = forward_failure(tonic::Status::unavailable("connection refused"));
        assert_eq!(refused, ServerError::ForwardFailed("Unavailable: connection refused".to_owned()));
        let status = tonic::Status::from(refused);
        assert_eq!(status.code(), tonic::Code::Unavailable, "clients treat it as transient");
        assert_eq!(
            status.message(),
            "etcdserver: forwarding to the leader failed: Unavailable: connection refused"
        );
        assert!(!matches!(
            forward_failure(tonic::Status::resource_exhausted("too large")),
            ServerError::LeaderChanged
        ));
    }
}
