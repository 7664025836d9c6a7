//! Starting and stopping a member: storage, Raft, the three listeners, background duties.

use openraft::async_runtime::WatchReceiver;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use openraft::{Config, SnapshotPolicy};
use tokio::sync::watch;
use tonic::transport::Server;

use crate::api::authority::AuthorityFix;
use crate::api::cluster::ClusterService;
use crate::api::kv::KvService;
use crate::api::maintenance::{MaintenanceService, VERSION};
use crate::api::peer::{PeerService, check_peer_request};
use crate::api::watch::WatchService;
use crate::health;
use crate::kv::MvccStore;
use crate::kv::watch::WatchHub;
use crate::member::{ForwardRequest, Identity, Node, NodeParts, cluster_id_for, member_id_for};
use crate::metrics::Metrics;
use crate::proto::etcdserverpb::cluster_server::ClusterServer;
use crate::proto::etcdserverpb::kv_server::KvServer;
use crate::proto::etcdserverpb::maintenance_server::MaintenanceServer;
use crate::proto::etcdserverpb::watch_server::WatchServer;
use crate::proto::raft::raft_peer_server::RaftPeerServer;
use crate::raft::log_store::LogStore;
use crate::raft::network::{PeerNetwork, StoreCopies};
use crate::raft::state_machine::StateMachine;
use crate::raft::types::Member;
use crate::storage::wal::WalOptions;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClusterState {
    New,
    Existing,
}

/// Everything a member needs to start, as etcd's flags describe it.
#[derive(Debug, Clone)]
pub struct MemberConfig {
    pub name: String,
    pub data_dir: PathBuf,
    pub listen_client: Vec<SocketAddr>,
    pub advertise_client_urls: Vec<String>,
    pub listen_peer: Vec<SocketAddr>,
    pub advertise_peer_urls: Vec<String>,
    /// `name=peer-url` pairs of the cluster's initial members.
    pub initial_cluster: Vec<(String, String)>,
    pub initial_cluster_state: ClusterState,
    pub initial_cluster_token: String,
    pub listen_metrics: Vec<SocketAddr>,
    pub heartbeat_interval: Duration,
    pub election_timeout: Duration,
    /// Entries applied between automatic snapshots (etcd's `--snapshot-count`).
    pub snapshot_count: u64,
    /// Entries kept in the log behind a snapshot for slow followers.
    pub snapshot_catchup_entries: u64,
    /// WAL bytes written since the last snapshot that trigger another one.
    pub snapshot_bytes: u64,
    /// Payload bytes of the newest log entries held in memory (`WalOptions::held_bytes`).
    pub wal_held_bytes: u64,
    /// Bytes of the store's pages held in memory (`MvccStore::open_with_cache`).
    pub store_cache_bytes: usize,
    /// How often watchers that asked for progress notifications get one.
    pub watch_progress_notify_interval: Duration,
    /// The store's size limit (etcd's `--quota-backend-bytes`).
    pub quota_backend_bytes: u64,
}

/// Where a member keeps what under `--data-dir`: `run` and `restore` must agree.
pub(crate) struct Layout {
    pub member: PathBuf,
}

impl Layout {
    pub fn new(data_dir: &std::path::Path) -> Self {
        Self { member: data_dir.join("member") }
    }
    pub fn raft_log(&self) -> PathBuf {
        self.member.join("raft")
    }
    pub fn store(&self) -> PathBuf {
        self.member.join("kv.redb")
    }
    pub fn snapshots(&self) -> PathBuf {
        self.member.join("snap")
    }
}

/// The members `--initial-cluster` (`name=peer-url` pairs) describes, by the ids every
/// member derives from it and the token.
pub(crate) fn initial_members(initial_cluster: &[(String, String)], token: &str) -> BTreeMap<u64, Member> {
    let mut by_name: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (name, url) in initial_cluster {
        by_name.entry(name).or_default().push(url.clone());
    }
    by_name
        .into_iter()
        .map(|(name, peer_urls)| {
            let id = member_id_for(&peer_urls, token);
            (id, Member { name: name.to_owned(), peer_urls, client_urls: Vec::new() })
        })
        .collect()
}

/// This member's id as `--initial-cluster` knows it, or an error naming the mismatch.
pub(crate) fn own_initial_id(
    members: &BTreeMap<u64, Member>,
    name: &str,
    advertise_peer_urls: &[String],
    token: &str,
) -> anyhow::Result<u64> {
    let member_id = member_id_for(advertise_peer_urls, token);
    if !members.contains_key(&member_id) {
        bail!(
            "--initial-advertise-peer-urls {advertise_peer_urls:?} of {name:?} do not appear in --initial-cluster"
        );
    }
    Ok(member_id)
}

/// Works out who this member is: from its data directory when it has one (refusing data
/// of another cluster), from `--initial-cluster` for a new cluster, or from the running
/// cluster for a member added with MemberAdd.
async fn resolve_identity(config: &MemberConfig, dir: &std::path::Path) -> anyhow::Result<Identity> {
    let members = initial_members(&config.initial_cluster, &config.initial_cluster_token);
    let ids: Vec<u64> = members.keys().copied().collect();
    let new_cluster_id = cluster_id_for(&ids, &config.initial_cluster_token);
    if let Some(identity) = Identity::load(dir)? {
        if identity.name != config.name {
            bail!(
                "data directory {} belongs to member {:?}, not {:?}",
                dir.display(),
                identity.name,
                config.name
            );
        }
        // As etcd does, a member with data ignores the bootstrap flags: the membership may
        // have changed since. It never bootstraps again, and peers of another cluster are
        // refused on the peer port (cluster id check).
        if config.initial_cluster_state == ClusterState::New && identity.cluster_id != new_cluster_id {
            tracing::warn!(
                "data directory belongs to cluster {:x}; --initial-cluster describes {:x}; using the data directory",
                identity.cluster_id,
                new_cluster_id
            );
        }
        return Ok(identity);
    }
    match config.initial_cluster_state {
        ClusterState::New => {
            let member_id = own_initial_id(
                &members,
                &config.name,
                &config.advertise_peer_urls,
                &config.initial_cluster_token,
            )?;
            let identity = Identity {
                name: config.name.clone(),
                member_id,
                cluster_id: new_cluster_id,
                founding: Some(members),
            };
            identity.save(dir)?;
            crate::failpoint::eval("identity-saved")?;
            Ok(identity)
        }
        ClusterState::Existing => {
            let identity = join_existing(config).await?;
            identity.save(dir)?;
            Ok(identity)
        }
    }
}

/// Asks the members in `--initial-cluster` which id the cluster gave this member's peer
/// URL (MemberAdd), polling until one of them answers.
///
/// Refuses an id that belongs to a voter which has already run (see `refuse_lost_voter`).
async fn join_existing(config: &MemberConfig) -> anyhow::Result<Identity> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        for (name, url) in &config.initial_cluster {
            if config.advertise_peer_urls.contains(url) {
                continue;
            }
            let peer = Member { name: name.clone(), peer_urls: vec![url.clone()], client_urls: Vec::new() };
            let Ok((cluster_id, members)) = crate::member::ask_roster(&peer).await else { continue };
            let own: Vec<&crate::member::MemberInfo> = members
                .iter()
                .filter(|m| m.member.peer_urls.iter().any(|u| config.advertise_peer_urls.contains(u)))
                .collect();
            // Two ids at these peer URLs: the voter that lost its data and the learner added
            // to replace it. The learner is this member; the old voter's id is refused.
            if let Some(joining) = own.iter().find(|m| refuse_lost_voter(m).is_ok()) {
                return Ok(Identity {
                    name: config.name.clone(),
                    member_id: joining.id,
                    cluster_id,
                    founding: None,
                });
            }
            if let Some(lost) = own.first() {
                refuse_lost_voter(lost)?;
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "no member of --initial-cluster knows peer URLs {:?}: add this member first (etcdctl member add)",
                config.advertise_peer_urls
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A member starting with no data must not take the id of a voter that has already run.
///
/// That voter's log is gone, but the cluster still counts its vote: starting it empty would
/// let it vote with an empty log, so an entry the cluster acknowledged on its old log could
/// lose its majority and a leader without it could be elected. "Has already run" is read
/// from the membership: a member's name is empty from `member add` until the member itself
/// starts and publishes it through the log (`publish_client_urls`), and members of the
/// initial cluster are named from `--initial-cluster`, which they bootstrap with data. A
/// voter added by `member add` without `--learner` and never started has no name, so it
/// still joins empty, as in etcd.
pub(crate) fn refuse_lost_voter(own: &crate::member::MemberInfo) -> Result<(), LostVoterData> {
    if own.is_learner || own.member.name.is_empty() {
        return Ok(());
    }
    Err(LostVoterData {
        id: own.id,
        name: own.member.name.clone(),
        peer_urls: own.member.peer_urls.join(","),
    })
}

/// The exit code of a member refused by `refuse_lost_voter`, so that whoever runs it (the
/// operator, through the pod's last termination state) can tell this apart from a crash and
/// replace the member instead of restarting it.
pub const LOST_DATA_EXIT_CODE: i32 = 78;

#[derive(Debug, thiserror::Error)]
#[error(
    "member {id:x} ({name:?}) lost its data: it is a voter that has run before, but its data \
     directory is empty, and joining would let it vote with an empty log. Remove it (etcdctl \
     member remove {id:x}), add it again as a learner (etcdctl member add {name} --learner \
     --peer-urls={peer_urls}), then start it again with an empty data directory; promote it once \
     it has caught up"
)]
pub struct LostVoterData {
    pub id: u64,
    pub name: String,
    pub peer_urls: String,
}

/// How long a stopping member lets requests in flight finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Runs a member until `shutdown` resolves, then hands leadership over and stops.
pub async fn run(
    config: MemberConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let layout = Layout::new(&config.data_dir);
    let dir = layout.member.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut identity = resolve_identity(&config, &dir).await?;
    tracing::info!(name = %identity.name, member = %format!("{:x}", identity.member_id), cluster = %format!("{:x}", identity.cluster_id), "starting member");

    let metrics = Metrics::new(identity.member_id, VERSION);
    let log_store = LogStore::open(
        &layout.raft_log(),
        WalOptions { held_bytes: config.wal_held_bytes, ..WalOptions::default() },
        metrics.clone(),
    )
    .with_context(|| format!("opening the Raft log in {}", dir.display()))?;
    let db_path = layout.store();
    let store = Arc::new(
        MvccStore::open_with_cache(&db_path, config.store_cache_bytes)
            .with_context(|| format!("opening {}", db_path.display()))?,
    );
    store.observe_commits({
        let metrics = metrics.clone();
        Box::new(move |took| metrics.backend_commit(took))
    });
    let last_data_index = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let watch_hub = WatchHub::new();
    let state_machine = StateMachine::new(
        store.clone(),
        layout.snapshots(),
        metrics.clone(),
        last_data_index.clone(),
        watch_hub.clone(),
    )?;

    let (election_timeout_min, election_timeout_max) =
        crate::raft::election_timeouts(config.election_timeout, config.heartbeat_interval);
    let raft_config = Config {
        cluster_name: format!("{:x}", identity.cluster_id),
        heartbeat_interval: config.heartbeat_interval.as_millis() as u64,
        election_timeout_min,
        election_timeout_max,
        enable_pre_vote: Some(true),
        snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_count),
        max_in_snapshot_log_to_keep: config.snapshot_catchup_entries,
        install_snapshot_timeout: 10_000,
        // A restarted leader stands for election like any member (standard Raft), never takes
        // its old term's leadership back at once (openraft's default). A leader replicates
        // entries before its own log has them durable, so a quorum of followers can commit
        // entries its log lost in the crash; back as leader of the same term it then wrote
        // other entries at those indexes under the same log ids, and the followers took them
        // for the ones they had: members diverged (found by the chaos harness, seed 13 of
        // `CLASSES=fsync`). An election makes it learn the committed log first.
        enable_leader_restore: Some(false),
        ..Config::default()
    }
    .validate()
    .context("Raft configuration")?;
    let raft = crate::raft::start(
        identity.member_id,
        Arc::new(raft_config),
        PeerNetwork::new(
            metrics.clone(),
            identity.cluster_id,
            StoreCopies { store: store.clone(), dir: layout.snapshots() },
        ),
        log_store,
        state_machine,
    )
    .await
    .context("starting Raft")?;
    if let Some(founding) = identity.founding.take() {
        if raft.is_initialized().await.context("reading Raft state")? {
            // Raft's state read back from disk at this start: the bootstrap is behind us.
            identity.save(&dir).context("saving the member identity")?;
        } else {
            // The identity on disk keeps `founding` until a later start reads Raft's state
            // back: `initialize` returning says nothing of it being durable yet.
            raft.initialize(founding).await.context("bootstrapping the cluster")?;
        }
    }
    let node = Arc::new(Node::new(NodeParts {
        identity,
        raft,
        store,
        metrics,
        db_path,
        last_data_index,
        leases: crate::lease::LeaseClock::new(config.election_timeout),
        watch_hub,
        quota_bytes: config.quota_backend_bytes,
        election_timeout: config.election_timeout,
    }));

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for addr in &config.listen_peer {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening for peers on {addr}"))?;
        let service = tonic::service::interceptor::InterceptedService::new(
            RaftPeerServer::new(PeerService::new(node.clone(), dir.join("snap-incoming")))
                .max_decoding_message_size(64 << 20),
            check_peer_request(node.identity.cluster_id, node.identity.member_id),
        );
        let stop = stopped(stop_rx.clone());
        tasks.spawn(async move {
            Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming(listener), stop)
                .await
                .context("peer server")
        });
    }
    for addr in &config.listen_client {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening for clients on {addr}"))?;
        let stop = stopped(stop_rx.clone());
        let lease = crate::api::lease::LeaseService::new(node.clone());
        let lock = crate::api::lock::LockService::new(node.clone());
        let election = crate::api::election::ElectionService::new(node.clone());
        let admin = crate::api::admin::AdminService::new(node.clone());
        let (kv, cluster, maintenance, watch) = (
            KvService::new(node.clone()),
            ClusterService::new(node.clone()),
            MaintenanceService::new(node.clone()),
            WatchService::new(node.clone(), config.watch_progress_notify_interval),
        );
        tasks.spawn(async move {
            Server::builder()
                .add_service(KvServer::new(kv))
                .add_service(ClusterServer::new(cluster))
                .add_service(crate::proto::etcdserverpb::lease_server::LeaseServer::new(lease))
                .add_service(MaintenanceServer::new(maintenance))
                .add_service(WatchServer::new(watch))
                .add_service(crate::proto::v3lockpb::lock_server::LockServer::new(lock))
                .add_service(crate::proto::v3electionpb::election_server::ElectionServer::new(election))
                .add_service(crate::proto::admin::admin_server::AdminServer::new(admin))
                .serve_with_incoming_shutdown(client_incoming(listener), stop)
                .await
                .context("client server")
        });
    }
    for addr in &config.listen_metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening for metrics on {addr}"))?;
        tasks.spawn(health::serve(listener, node.clone(), stopped(stop_rx.clone())));
    }
    tasks.spawn(watch_leadership(node.clone(), stopped(stop_rx.clone())));
    tasks.spawn(crate::lease::expire_leases(node.clone(), stopped(stop_rx.clone())));
    tasks.spawn(snapshot_by_size(node.clone(), config.snapshot_bytes, stopped(stop_rx.clone())));
    tasks.spawn(commit_store_durably(node.clone(), stopped(stop_rx.clone())));
    tasks.spawn(publish_client_urls(
        node.clone(),
        config.name.clone(),
        config.advertise_client_urls.clone(),
        stopped(stop_rx.clone()),
    ));

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(result) = tasks.join_next() => {
                // Duties may finish; a listener that fails stops the member rather than
                // leave half of it running.
                result.context("member task panicked")??;
            }
        }
    }
    tracing::info!("stopping");
    hand_over_leadership(&node).await;
    let _ = stop_tx.send(true);
    // Servers stop taking new connections at once but wait for open ones to close, and a
    // peer's connection stays open while it sends heartbeats: after a grace period for
    // requests in flight, stop waiting.
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while let Some(result) = tasks.join_next().await {
            if let Ok(Err(e)) = result {
                tracing::warn!("while stopping: {e:#}");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::info!("closing the connections still open after {SHUTDOWN_GRACE:?}");
        tasks.shutdown().await;
    }
    node.raft.shutdown().await.context("stopping Raft")?;
    node.store.sync().context("flushing the key-value store")?;
    Ok(())
}

/// Accepted connections with Nagle's algorithm off: gRPC answers are small frames written
/// separately, and Nagle would hold the later ones until the peer's delayed ACK (~40 ms).
fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Client connections, with etcd Go clients' URL-shaped `:authority` accepted (see
/// `api::authority`).
fn client_incoming(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<AuthorityFix<tokio::net::TcpStream>>> {
    use futures::StreamExt;
    incoming(listener).map(|stream| stream.map(AuthorityFix::new))
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// A leader that stops on purpose hands leadership to the most up-to-date voter first, so
/// the cluster does not wait out an election timeout.
async fn hand_over_leadership(node: &Node) {
    let metrics = node.raft.metrics().borrow_watched().clone();
    if metrics.current_leader != Some(node.identity.member_id) {
        return;
    }
    let voters: Vec<u64> = metrics
        .membership_config
        .membership()
        .voter_ids()
        .filter(|id| *id != node.identity.member_id)
        .collect();
    let best = metrics.replication.as_ref().and_then(|r| {
        voters.iter().max_by_key(|id| r.get(id).cloned().flatten().map_or(0, |l| l.index)).copied()
    });
    let Some(target) = best else { return };
    if node.execute_as_leader(ForwardRequest::TransferLeader(target)).await.is_err() {
        return;
    }
    let mut watch = node.raft.metrics();
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while watch.borrow_watched().current_leader == Some(node.identity.member_id) {
            if watch.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    tracing::info!(to = %format!("{target:x}"), "handed leadership over before stopping");
}

/// Takes a snapshot once the WAL has grown by `threshold` bytes since the last one, so a
/// store of large values is compacted as promptly as one of many small ones (openraft's
/// own policy counts entries).
async fn snapshot_by_size(
    node: Arc<Node>,
    threshold: u64,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(stop);
    let mut last_snapshot = node.raft.metrics().borrow_watched().snapshot;
    let mut baseline = node.metrics.wal_bytes_written();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            () = &mut stop => return Ok(()),
            _ = tick.tick() => {}
        }
        let snapshot = node.raft.metrics().borrow_watched().snapshot;
        let written = node.metrics.wal_bytes_written();
        if snapshot != last_snapshot {
            last_snapshot = snapshot;
            baseline = written;
        } else if written.saturating_sub(baseline) >= threshold {
            tracing::info!(bytes = written - baseline, "WAL grew past --snapshot-bytes; taking a snapshot");
            node.raft.trigger().snapshot().await.context("triggering a snapshot")?;
            baseline = written;
        }
    }
}

/// The longest applied writes wait to be made durable in the store while entries are
/// applied. etcd commits its backend every 100 ms (`--backend-batch-interval`), but each of
/// our durable commits writes every page its puts touched, and a put of a new key touches a
/// leaf of the versions tree of its own (etcd keeps that index in memory): under
/// `etcdctl check perf --load=l` a member wrote about 500 pages per commit, 3.8 % of the
/// machine's CPU in `pwrite` and 2.7 % in the store's `fdatasync`. Once a second, the pages
/// a second's puts share (the tree's branches, the values' leaves) are written once instead
/// of ten times: 30 % fewer `pwrite`s and 4-8 % more writes per second.
const DURABLE_COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// Entries applied since the last durable commit that make the next one due before
/// `DURABLE_COMMIT_INTERVAL` (etcd's `--backend-batch-limit`): they bound what a restart
/// applies again and the pages held in memory until they are written.
const DURABLE_COMMIT_ENTRIES: u64 = 10_000;

/// Bytes of keys and values applied since the last durable commit that make the next one
/// due sooner too. A second of puts of 64 KiB values (`make bench`'s backup fill, 16
/// clients) is tens of megabytes for one commit to write, and in the one run without this
/// bound a put of that fill failed with "leader changed". 8 MiB keeps a commit's writes to a
/// few hundredths of a second of this disk (about 250 MB/s), while a second of
/// `check perf --load=l` puts is about 4 MB.
const DURABLE_COMMIT_BYTES: u64 = 8 << 20;

/// How often the loop looks whether a durable commit is due.
const DURABLE_COMMIT_CHECK: Duration = Duration::from_millis(100);

/// Whether the store is due a durable commit, `since` the last one with `applied` entries
/// applied after it, which put `bytes` of keys and values.
fn durable_commit_due(since: Duration, applied: u64, bytes: u64) -> bool {
    applied > 0
        && (since >= DURABLE_COMMIT_INTERVAL
            || applied >= DURABLE_COMMIT_ENTRIES
            || bytes >= DURABLE_COMMIT_BYTES)
}

/// Makes the store durable when `durable_commit_due` says so: it commits the applied writes
/// no read has committed yet, and fsyncs those reads committed without (the log has them).
/// redb reuses a page freed since its last durable commit only after the next one: with
/// durable commits only at snapshots, every page rewritten between two snapshots stayed
/// allocated, up to twice the store.
async fn commit_store_durably(
    node: Arc<Node>,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(stop);
    let applied = || node.raft.metrics().borrow_watched().last_applied.map_or(0, |a| a.index);
    let mut durable = applied();
    let mut durable_at = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(DURABLE_COMMIT_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut stop => return Ok(()),
            _ = tick.tick() => {}
        }
        let now = applied();
        if !durable_commit_due(
            durable_at.elapsed(),
            now.saturating_sub(durable),
            node.store.bytes_not_durable(),
        ) {
            continue;
        }
        let store = node.store.clone();
        tokio::task::spawn_blocking(move || store.sync())
            .await
            .context("durable commit task")?
            .context("making the key-value store durable")?;
        durable = now;
        durable_at = tokio::time::Instant::now();
    }
}

/// Keeps the leadership and progress metrics in step with Raft's own.
async fn watch_leadership(
    node: Arc<Node>,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut watch = node.raft.metrics();
    let mut previous = None;
    tokio::pin!(stop);
    loop {
        let m = watch.borrow_watched().clone();
        if let Err(fatal) = &m.running_state {
            // Raft stops for good on a storage error (a failed fdatasync cannot be retried
            // safely): the member exits, as etcd does, so whoever runs it starts it again,
            // rather than keep its ports open with nothing behind them.
            bail!("Raft stopped: {fatal}; exiting so that the member is restarted");
        }
        // Peers first, so no scrape sees a leader but not the peer metrics.
        for (peer, _) in
            m.membership_config.membership().nodes().filter(|(id, _)| **id != node.identity.member_id)
        {
            node.metrics.add_peer(*peer);
        }
        let is_learner =
            m.membership_config.membership().learner_ids().any(|id| id == node.identity.member_id);
        node.metrics.observe_leadership(
            previous,
            m.current_leader,
            m.current_leader == Some(node.identity.member_id),
            is_learner,
        );
        node.metrics.observe_progress(
            m.local_committed.map_or(0, |c| c.index),
            m.last_applied.map_or(0, |a| a.index),
        );
        node.metrics.db_size(node.recent_db_size());
        if m.current_leader != previous {
            // As etcd's raft logs "elected leader at term": the one line that dates a failover.
            tracing::info!(leader = ?m.current_leader.map(|id| format!("{id:x}")), term = m.current_term, "leader changed");
        }
        previous = m.current_leader;
        tokio::select! {
            () = &mut stop => return Ok(()),
            changed = watch.changed() => if changed.is_err() { return Ok(()) },
        }
    }
}

/// Members learn each other's client URLs through the log: each member publishes its own
/// once a leader is known, as etcd members publish their attributes.
async fn publish_client_urls(
    node: Arc<Node>,
    name: String,
    client_urls: Vec<String>,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(stop);
    loop {
        let published = node.members().iter().any(|m| {
            m.id == node.identity.member_id && m.member.client_urls == client_urls && m.member.name == name
        });
        if published {
            return Ok(());
        }
        let request = ForwardRequest::PublishClientUrls {
            id: node.identity.member_id,
            name: name.clone(),
            client_urls: client_urls.clone(),
        };
        if let Err(e) = node.on_leader(request).await {
            tracing::debug!("publishing client URLs: {e}");
        }
        tokio::select! {
            () = &mut stop => return Ok(()),
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_durable_commit_comes_a_second_after_the_last_or_sooner_after_many_entries_or_bytes() {
        let tick = DURABLE_COMMIT_CHECK;
        let kib = 1 << 10;
        // Nothing applied: nothing to make durable, however long ago the last commit was.
        assert!(!durable_commit_due(Duration::from_secs(60), 0, 0));
        // A steady load of small puts is made durable once a second, not at every look.
        assert!(!durable_commit_due(tick, 400, 400 * kib));
        assert!(!durable_commit_due(Duration::from_millis(900), 3_600, 3_600 * kib));
        assert!(durable_commit_due(Duration::from_secs(1), 4_000, 4_000 * kib));
        // A heavier one sooner, so a restart never applies more than a batch's worth again.
        assert!(!durable_commit_due(tick, DURABLE_COMMIT_ENTRIES - 1, 0));
        assert!(durable_commit_due(tick, DURABLE_COMMIT_ENTRIES, 0));
        // Large values sooner, so that no commit writes much more than 8 MiB of them.
        assert!(!durable_commit_due(tick, 127, 127 * 64 * kib));
        assert!(durable_commit_due(tick, 128, 128 * 64 * kib));
        // A lone write after a quiet spell waits for the next look only.
        assert!(durable_commit_due(Duration::from_secs(5), 1, 10));
    }
}
