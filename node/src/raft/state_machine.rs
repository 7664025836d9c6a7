//! openraft's state machine over the MVCC store, and its snapshots.
//!
//! Applies commit without fsync: the Raft log already holds every applied entry durably,
//! so after a crash the member re-applies the log tail from the applied index the store
//! last made durable.
//!
//! A Raft snapshot is the store itself, as etcd's is its database: building one makes the
//! store durable and records the log id it is durable at least up to in a marker file
//! (`MARKER`, the postcard-encoded `SnapshotMeta`, length-prefixed, and a SHA-256 of both),
//! so the log up to there may be purged. Only a follower that needs a snapshot gets a copy
//! of the store, written when it is sent, as of then and with that state's log id
//! (`snapshot_of_store`); the leader's replication counts the follower as holding the
//! marker's, earlier, log id, which is safe (openraft takes a follower's committed entries
//! as present when the leader sends them again). Before markers every snapshot copied the
//! whole store into a file, 1-5 s each under `etcdctl check perf --load=l`.
//!
//! A snapshot file (a copy of the store) is `MAGIC`, the meta as in a marker, the store's
//! records, zeros up to a multiple of 512 bytes, and a SHA-256 of everything before it. The
//! padding is for etcd's clients: etcdctl (3.4.23 and later) refuses a saved snapshot unless
//! its length is 32 more than a multiple of 512, which etcd's page-sized database plus
//! checksum always is. Files of the first version (`MAGIC_V1`) have no padding; files of the
//! first two (`MAGIC_V2`) also carry every live key-value a second time, which restore
//! skips. Both are still read. The current magic is new because its files leave out what
//! members of those versions expect, so they refuse it instead of restoring a store with no
//! live keys. A snapshot file in the snapshot directory, as members kept before markers,
//! counts as a marker of its log id.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, TryStreamExt};
use openraft::EntryPayload;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::type_config::alias::SnapshotOf;
use sha2::{Digest, Sha256};

use super::types::{Applied, Command, Entry, LogId, Membership, SnapshotMeta, StoredMembership, TypeConfig};
use crate::kv::watch::WatchHub;
use crate::kv::{Applying, KvError, MvccStore, ReadView, apply_command};
use crate::metrics::{ApplyStage, Metrics};
use crate::storage::hard_state::sync_dir;

const MAGIC: &[u8; 8] = b"CNSNAP03";
/// A marker: the store is durable at least up to the log id it holds. Never a snapshot
/// file: restoring one would empty the store.
const MARKER: &[u8; 8] = b"CNMARK01";
const MAGIC_V2: &[u8; 8] = b"CNSNAP02";
const MAGIC_V1: &[u8; 8] = b"CNSNAP01";
/// The part of a snapshot file before its checksum is a multiple of this many bytes.
const SNAPSHOT_ALIGN: u64 = 512;
const META_APPLIED: &str = "raft_applied";
const META_MEMBERSHIP: &str = "raft_membership";
/// etcd's expected duration of an apply, past which it warns.
const SLOW_APPLY: Duration = Duration::from_millis(100);
/// An entry that changes this many keys or more makes its batch commit durably. Its pages
/// would otherwise be written by the next periodic durable commit, which holds the store
/// while it writes them: the batches after it, other clients' writes, would wait for the
/// large request's pages (0.6-2.5 s after etcdctl check perf deleted its 60,000 keys). The
/// batch that holds the large request waits for them instead.
const LARGE_REQUEST_KEYS: usize = 4096;

pub type RaftSnapshot = SnapshotOf<TypeConfig, SnapshotData>;

/// A snapshot's data, as openraft hands it between the state machine and the network.
#[derive(Debug, Clone)]
pub enum SnapshotData {
    /// The member's own store, durable at least up to the snapshot's log id: sent as a copy
    /// of the store when it is sent, with that copy's own log id (see the module comment).
    Store,
    /// A snapshot file received from the leader, to install.
    File(PathBuf),
}

fn io_err(e: KvError) -> io::Error {
    io::Error::other(e)
}

fn invalid(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

pub struct StateMachine {
    store: Arc<MvccStore>,
    snapshot_dir: SnapshotDir,
    metrics: Metrics,
    last_data_index: Arc<AtomicU64>,
    watch_hub: WatchHub,
}

impl StateMachine {
    /// `last_data_index` is kept at the index of the last applied entry that changed data
    /// or membership (blank entries change neither); reads use it (see `member`).
    pub fn new(
        store: Arc<MvccStore>,
        snapshot_dir: PathBuf,
        metrics: Metrics,
        last_data_index: Arc<AtomicU64>,
        watch_hub: WatchHub,
    ) -> io::Result<Self> {
        let snapshot_dir = SnapshotDir::create(snapshot_dir)?;
        let state_machine = Self { store, snapshot_dir, metrics, last_data_index, watch_hub };
        // Until it applies more, everything applied so far may have changed data.
        let applied = state_machine.read_applied()?.0.map_or(0, |id| id.index);
        state_machine.last_data_index.store(applied, Ordering::SeqCst);
        Ok(state_machine)
    }

    /// Builds a snapshot of the store if it has applied entries past `log_end`, the last
    /// entry of the log on disk, and no snapshot covers them yet.
    ///
    /// A leader applies an entry once a quorum of followers holds it, possibly before its own
    /// log's write of it reached the disk, and the store is made durable every second. So a
    /// crash can leave the store ahead of the log. openraft then purges the log up to the
    /// store's last applied entry as it starts, and refuses to run unless a snapshot covers
    /// that purge point (chaos-ci, seed 13 of the fsync class: purge point 2180, snapshot 2006).
    pub async fn snapshot_if_ahead_of(&mut self, log_end: Option<LogId>) -> io::Result<()> {
        let (applied, _) = self.read_applied()?;
        if applied <= log_end {
            return Ok(());
        }
        let covered = self.get_current_snapshot().await?.and_then(|snapshot| snapshot.meta.last_log_id);
        if covered >= applied {
            return Ok(());
        }
        tracing::info!(?applied, ?log_end, ?covered, "the store is ahead of the Raft log: taking a snapshot");
        self.get_snapshot_builder().await.build_snapshot().await.map(drop)
    }

    fn read_applied(&self) -> io::Result<(Option<LogId>, StoredMembership)> {
        let meta = raft_meta(&self.store.read().map_err(io_err)?)?;
        Ok((meta.last_log_id, meta.last_membership))
    }
}

/// Entries to apply, each with where its answer goes if a client waits for it.
type Entries = Vec<EntryResponder<TypeConfig>>;

/// What applying a batch reports to: metrics, reads and watchers.
struct Applier {
    metrics: Metrics,
    last_data_index: Arc<AtomicU64>,
    watch_hub: WatchHub,
}

impl Applier {
    /// Applies brief entries on this thread if the store is free at once; hands back what
    /// it was given otherwise.
    fn apply_here(
        self,
        store: &MvccStore,
        brief: bool,
        entries: Entries,
        started: Instant,
    ) -> io::Result<Result<(), (Self, Entries)>> {
        let applying = if brief { store.try_applying_briefly().map_err(io_err)? } else { None };
        match applying {
            Some(applying) => self.apply(applying, entries, started).map(Ok),
            None => Ok(Err((self, entries))),
        }
    }

    /// Applies `entries` to `applying`, whose wait began at `started`, and sends the answers.
    /// They go out once the batch is applied, its writes committed or not: the store commits
    /// them before any later read (`MvccStore::applying`), so a client that got an answer
    /// reads what it wrote.
    fn apply(&self, mut applying: Applying<'_>, entries: Entries, started: Instant) -> io::Result<()> {
        let Self { metrics, last_data_index, watch_hub } = self;
        let count = entries.len();
        let previous_values = watch_hub.wants_previous_values();
        applying.batch().set_previous_values(previous_values);
        let waited = started.elapsed();
        metrics.apply_stage(ApplyStage::Wait, waited);
        let mut answers = Vec::with_capacity(entries.len());
        let mut last = None;
        let mut large_request = false;
        let mut data_index = None;
        for (entry, responder) in entries {
            if !matches!(entry.payload, EntryPayload::Blank) {
                data_index = Some(entry.log_id.index);
            }
            let applied = match &entry.payload {
                EntryPayload::Blank => Applied::Nothing,
                EntryPayload::Normal(command) => {
                    if let (Command::DeleteRange(_), Some(_)) = (command, last) {
                        // A large DeleteRange commits in steps (`Applying::delete_range`);
                        // each says the entries before it are applied and it is not, so
                        // that after a crash it is applied again, whole.
                        applying
                            .batch()
                            .set_meta(META_APPLIED, &postcard::to_stdvec(&last).map_err(invalid)?)
                            .map_err(io_err)?;
                    }
                    let before = applying.batch().changed_keys();
                    let applied = apply_command(&mut applying, command).map_err(io_err)?;
                    if applying.batch().changed_keys() - before >= LARGE_REQUEST_KEYS {
                        applying.batch().commit_durably().map_err(io_err)?;
                        large_request = true;
                    }
                    applied
                }
                EntryPayload::Membership(membership) => {
                    let stored = StoredMembership::new(Some(entry.log_id), membership.clone());
                    applying
                        .batch()
                        .set_meta(META_MEMBERSHIP, &postcard::to_stdvec(&stored).map_err(invalid)?)
                        .map_err(io_err)?;
                    Applied::Nothing
                }
            };
            last = Some(entry.log_id);
            answers.push((responder, applied));
        }
        applying
            .batch()
            .set_meta(META_APPLIED, &postcard::to_stdvec(&last).map_err(invalid)?)
            .map_err(io_err)?;
        let applied_in = started.elapsed() - waited;
        metrics.apply_stage(ApplyStage::Apply, applied_in);
        let (events, committed) = applying.finish().map_err(io_err)?;
        if let Some(committed) = committed {
            metrics.apply_stage(ApplyStage::Commit, committed);
        }
        let took = started.elapsed();
        if took > SLOW_APPLY {
            // etcd's "apply request took too long", for a batch.
            tracing::warn!(
                ?took,
                entries = count,
                ?waited,
                applying = ?applied_in,
                ?committed,
                expected = ?SLOW_APPLY,
                "applying a batch of committed entries took too long"
            );
        }
        // Published in the order applied: openraft applies one batch at a time.
        watch_hub.committed(events, previous_values);
        if let Some(index) = data_index {
            last_data_index.store(index, Ordering::SeqCst);
        }
        for (responder, applied) in answers {
            if let Some(responder) = responder {
                responder.send(applied);
            }
        }
        if large_request {
            // The batch's keys, pages and tombstones are freed by now, but held by this
            // thread until it works again. (Watch events and answers are freed by others.)
            crate::allocator::release_freed();
        }
        Ok(())
    }
}

/// Whether applying `entry` takes about as long as a put at most: see `MvccStore::applying`.
/// A DeleteRange, a Txn, a compaction or a lease's revocation may touch any number of keys.
fn applies_briefly(entry: &Entry) -> bool {
    match &entry.payload {
        EntryPayload::Blank | EntryPayload::Membership(_) => true,
        EntryPayload::Normal(command) => matches!(command, Command::Put(_) | Command::LeaseGrant(_)),
    }
}

/// The Raft state the store holds as of `view`: the last applied log id and the membership.
fn raft_meta(view: &ReadView) -> io::Result<SnapshotMeta> {
    let last_log_id = match view.meta(META_APPLIED).map_err(io_err)? {
        Some(bytes) => postcard::from_bytes(&bytes).map_err(invalid)?,
        None => None,
    };
    let last_membership = match view.meta(META_MEMBERSHIP).map_err(io_err)? {
        Some(bytes) => postcard::from_bytes(&bytes).map_err(invalid)?,
        None => StoredMembership::default(),
    };
    Ok(SnapshotMeta { last_log_id, last_membership })
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        self.read_applied()
    }

    async fn apply<Strm>(&mut self, entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + Send,
    {
        let entries: Vec<EntryResponder<TypeConfig>> = entries.try_collect().await?;
        if let Some((entry, _)) = entries.last() {
            self.metrics.log_committed(entry.log_id.index);
        }
        let started = Instant::now();
        let applier = Applier {
            metrics: self.metrics.clone(),
            last_data_index: self.last_data_index.clone(),
            watch_hub: self.watch_hub.clone(),
        };
        // Brief entries apply on this thread when the store is free, which saves two thread
        // hops per batch; they write nothing to disk, as they leave their commit to later.
        // The rest, or any when a reader or a durable commit holds the store, apply on a
        // blocking thread, so that the runtime's threads, which also carry heartbeats, never
        // wait for a commit.
        let brief = entries.iter().all(|(entry, _)| applies_briefly(entry));
        match applier.apply_here(&self.store, brief, entries, started)? {
            Ok(()) => Ok(()),
            Err((applier, entries)) => {
                let store = self.store.clone();
                tokio::task::spawn_blocking(move || {
                    applier.apply(store.applying(brief).map_err(io_err)?, entries, started)
                })
                .await
                .map_err(io::Error::other)?
            }
        }
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            store: self.store.clone(),
            snapshot_dir: self.snapshot_dir.clone(),
            metrics: self.metrics.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        // openraft installs what the network received, and, as the member starts, its own
        // snapshot if that is ahead of the store: with markers only when the store file was
        // lost or replaced behind the member's back, which a copy of it cannot mend.
        let SnapshotData::File(path) = snapshot else {
            return Err(invalid(format!(
                "the store has not applied up to {:?}, where the snapshot directory marks it durable: \
                 its file was lost or replaced; replace this member (remove it and add it again \
                 with an empty data directory)",
                meta.last_log_id
            )));
        };
        let store = self.store.clone();
        let dir = self.snapshot_dir.clone();
        let meta = meta.clone();
        self.metrics.log_replaced(meta.last_log_id.map_or(0, |id| id.index));
        let last_data_index = self.last_data_index.clone();
        let watch_hub = self.watch_hub.clone();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            let (file_meta, mut records) = open_snapshot(&path)?;
            if file_meta.last_log_id != meta.last_log_id {
                return Err(invalid("snapshot file does not match the snapshot being installed"));
            }
            // Durable when it returns: the marker may say so.
            store.restore(&mut records).map_err(io_err)?;
            watch_hub.replaced();
            dir.mark(&meta)?;
            tracing::info!(last_log_id = ?meta.last_log_id, "installed a snapshot from the leader");
            last_data_index.store(meta.last_log_id.map_or(0, |id| id.index), Ordering::SeqCst);
            Ok(())
        })
        .await
        .map_err(io::Error::other)?
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<RaftSnapshot>, io::Error> {
        let Some(path) = self.snapshot_dir.newest()? else { return Ok(None) };
        Ok(Some(RaftSnapshot { meta: marked(&path)?, snapshot: SnapshotData::Store }))
    }
}

pub struct SnapshotBuilder {
    store: Arc<MvccStore>,
    snapshot_dir: SnapshotDir,
    metrics: Metrics,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<RaftSnapshot, io::Error> {
        let store = self.store.clone();
        let dir = self.snapshot_dir.clone();
        let started = Instant::now();
        let snapshot =
            tokio::task::spawn_blocking(move || build(&store, &dir)).await.map_err(io::Error::other)?;
        self.metrics.backend_snapshot(started.elapsed());
        snapshot
    }
}

/// Makes the store durable and marks it so at the log id it had applied before.
fn build(store: &MvccStore, dir: &SnapshotDir) -> io::Result<RaftSnapshot> {
    let meta = raft_meta(&store.read().map_err(io_err)?)?;
    // Everything up to the marked log id must be durable in the store before the log behind
    // it may be purged; what the store applied since only adds to that.
    store.sync().map_err(io_err)?;
    match dir.mark(&meta)? {
        Kept::Current => Ok(RaftSnapshot { meta, snapshot: SnapshotData::Store }),
        // A newer snapshot came from the leader while this one was built: it stays current,
        // and is what openraft is told the build made.
        Kept::Superseded(newer) => Ok(RaftSnapshot { meta: marked(&newer)?, snapshot: SnapshotData::Store }),
    }
}

/// The log id a file of the snapshot directory marks the store durable up to: a marker's,
/// or that of a snapshot file kept there before markers.
fn marked(path: &Path) -> io::Result<SnapshotMeta> {
    open_verified(path, &[MARKER, MAGIC, MAGIC_V2, MAGIC_V1]).map(|(meta, _)| meta)
}

/// Writes `MAGIC` or `MARKER` and the length-prefixed meta.
fn write_header(out: &mut impl Write, magic: &[u8; 8], meta: &SnapshotMeta) -> io::Result<()> {
    out.write_all(magic)?;
    let header = postcard::to_stdvec(meta).map_err(invalid)?;
    out.write_all(&(header.len() as u32).to_le_bytes())?;
    out.write_all(&header)
}

/// Writes `view` in the snapshot file format (see the module comment) to `out`; `meta`
/// must be `raft_meta(view)`. The one writer of the format, for copies of the store sent to
/// followers and for the Maintenance API's.
fn write_snapshot<W: Write>(view: &ReadView, meta: &SnapshotMeta, out: W) -> io::Result<W> {
    let mut out = HashingWriter::new(out);
    write_header(&mut out, MAGIC, meta)?;
    view.dump(&mut out).map_err(io_err)?;
    let padding = (SNAPSHOT_ALIGN - out.written % SNAPSHOT_ALIGN) % SNAPSHOT_ALIGN;
    io::copy(&mut io::repeat(0).take(padding), &mut out)?;
    let (mut out, digest) = out.finish();
    out.write_all(&digest)?;
    out.flush()?;
    Ok(out)
}

/// The longest header a snapshot file may have: its metadata is a few ids and a membership,
/// a few hundred bytes for a large cluster.
const MAX_SNAPSHOT_HEADER: u64 = 1 << 20;

/// Length of the SHA-256 trailer that ends every snapshot file.
pub const SNAPSHOT_CHECKSUM_LEN: u64 = 32;

/// A copy of the store as of one read transaction, in the snapshot file format.
pub struct StoreSnapshot {
    /// The Raft state the copy holds: the log id it has applied up to, the membership.
    pub meta: SnapshotMeta,
    /// The copy's store revision.
    pub revision: i64,
    /// The file's length in bytes.
    pub len: u64,
    /// Positioned at its start; already unlinked.
    pub file: File,
}

/// A point-in-time copy of the store, for a client (etcd's Maintenance.Snapshot) or for a
/// follower that needs a snapshot, in a file of `dir` that is unlinked as soon as it is
/// created, so it takes no room once the returned handle is dropped and no crash leaves it
/// behind.
pub fn snapshot_of_store(store: &MvccStore, dir: &Path) -> io::Result<StoreSnapshot> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let view = store.read().map_err(io_err)?;
    let revision = view.revision().map_err(io_err)?;
    let meta = raft_meta(&view)?;
    let path = dir.join(format!("copy-{}.snap-tmp", NEXT.fetch_add(1, Ordering::Relaxed)));
    let file = fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
    fs::remove_file(&path)?;
    let mut file =
        write_snapshot(&view, &meta, BufWriter::new(file))?.into_inner().map_err(|e| e.into_error())?;
    let len = io::Seek::seek(&mut file, io::SeekFrom::End(0))?;
    io::Seek::seek(&mut file, io::SeekFrom::Start(0))?;
    Ok(StoreSnapshot { meta, revision, len, file })
}

/// Fills a fresh, empty store from a snapshot file (its checksum verified) as the first
/// state of a new cluster: the snapshot's keys and revisions, applied up to `log_id`, with
/// `members` as the voters as of that log id; and marks the store as the Raft snapshot of
/// `log_id` in `snapshot_dir`, so that a member joining later is sent a copy of it (the log
/// before `log_id` never exists).
pub fn seed_new_cluster(
    store: &MvccStore,
    snapshot: &Path,
    log_id: LogId,
    members: Membership,
    snapshot_dir: &Path,
) -> io::Result<RaftSnapshot> {
    let (_, mut records) = open_snapshot(snapshot)?;
    store.restore(&mut records).map_err(io_err)?;
    let mut batch = store.write(true).map_err(io_err)?;
    let membership = StoredMembership::new(Some(log_id), members);
    batch.set_meta(META_APPLIED, &postcard::to_stdvec(&Some(log_id)).map_err(invalid)?).map_err(io_err)?;
    batch.set_meta(META_MEMBERSHIP, &postcard::to_stdvec(&membership).map_err(invalid)?).map_err(io_err)?;
    batch.commit().map_err(io_err)?;
    build(store, &SnapshotDir::create(snapshot_dir.to_owned())?)
}

/// The directory that holds a member's Raft snapshot: one marker, the newest kept.
///
/// openraft builds a snapshot in a task of its own while the state machine goes on applying
/// and installing. A build of an older state can therefore finish after a newer snapshot from
/// the leader was installed and the log behind that one purged. Keeping the build's file then
/// would leave the snapshot on disk older than the purge point, and openraft refuses to start
/// from that. So keeping never goes backwards, and the check and the swap happen under one
/// lock.
#[derive(Clone)]
struct SnapshotDir {
    path: PathBuf,
    keeping: Arc<Mutex<()>>,
}

/// What `SnapshotDir::keep` did with a file.
enum Kept {
    /// It is the snapshot now.
    Current,
    /// It was dropped for the newer snapshot at this path.
    Superseded(PathBuf),
}

impl SnapshotDir {
    fn create(path: PathBuf) -> io::Result<Self> {
        fs::create_dir_all(&path)?;
        // What a crash left of a marker being written.
        for entry in fs::read_dir(&path)? {
            let file = entry?.path();
            if file.extension().is_some_and(|e| e == "tmp") {
                fs::remove_file(file)?;
            }
        }
        Ok(Self { path, keeping: Arc::new(Mutex::new(())) })
    }

    /// Writes a marker of `meta` (see the module comment) and keeps it.
    fn mark(&self, meta: &SnapshotMeta) -> io::Result<Kept> {
        // A build and an install may mark the same log id at once (a build waits for an
        // install's restore and then reads its log id): each writes a file of its own.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let tmp = self.path.join(format!(
            "{}.{}.tmp",
            snapshot_file_name(meta),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let mut out = HashingWriter::new(File::create(&tmp)?);
        write_header(&mut out, MARKER, meta)?;
        let (mut file, digest) = out.finish();
        file.write_all(&digest)?;
        file.sync_all()?;
        self.keep(&tmp, meta)
    }

    /// Moves `file` into place as the snapshot and removes older ones, unless a newer one is
    /// already there; then `file` is removed.
    fn keep(&self, file: &Path, meta: &SnapshotMeta) -> io::Result<Kept> {
        let _keeping = self.keeping.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.path.join(snapshot_file_name(meta));
        if let Some(newer) = self.newest()?.filter(|newest| newest > &path) {
            fs::remove_file(file)?;
            return Ok(Kept::Superseded(newer));
        }
        if file != path {
            fs::rename(file, &path)?;
        }
        sync_dir(&self.path)?;
        for other in self.files()?.into_iter().filter(|other| other != &path) {
            fs::remove_file(other)?;
        }
        Ok(Kept::Current)
    }

    fn newest(&self) -> io::Result<Option<PathBuf>> {
        Ok(self.files()?.into_iter().max())
    }

    /// The snapshot files in the directory (not the partial `.tmp` files of builds).
    fn files(&self) -> io::Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        for entry in fs::read_dir(&self.path)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "snap") {
                files.push(path);
            }
        }
        Ok(files)
    }
}

/// Snapshot files sort by the log index they cover.
pub fn snapshot_file_name(meta: &SnapshotMeta) -> String {
    match &meta.last_log_id {
        Some(id) => format!("{:020}-{}.snap", id.index, id.leader_id.term),
        None => "00000000000000000000-0.snap".to_owned(),
    }
}

/// Verifies a snapshot file's checksum and returns its metadata and a reader positioned at
/// its records (excluding the checksum).
pub fn open_snapshot(path: &Path) -> io::Result<(SnapshotMeta, impl Read + use<>)> {
    open_verified(path, &[MAGIC, MAGIC_V2, MAGIC_V1])
}

/// Verifies the checksum of a file that starts with one of `magics` and its header and
/// returns the header's metadata and a reader positioned after it (excluding the checksum).
fn open_verified(path: &Path, magics: &[&[u8; 8]]) -> io::Result<(SnapshotMeta, impl Read + use<>)> {
    let bytes_len = fs::metadata(path)?.len();
    let body_len = bytes_len
        .checked_sub(SNAPSHOT_CHECKSUM_LEN)
        .ok_or_else(|| invalid(format!("{}: too short", path.display())))?;
    let mut hasher = Sha256::new();
    io::copy(&mut BufReader::new(File::open(path)?).take(body_len), &mut HashWriter(&mut hasher))?;
    let mut stored = [0u8; 32];
    let mut file = File::open(path)?;
    io::Seek::seek(&mut file, io::SeekFrom::Start(body_len))?;
    file.read_exact(&mut stored)?;
    if hasher.finalize().as_slice() != stored {
        return Err(invalid(format!("{}: checksum mismatch, the snapshot is damaged", path.display())));
    }
    let mut reader = BufReader::new(File::open(path)?).take(body_len);
    let mut magic = [0u8; 8];
    reader.read_exact(&mut magic)?;
    if !magics.contains(&&magic) {
        return Err(invalid(format!("{}: not a consensus-node snapshot", path.display())));
    }
    let mut len = [0u8; 4];
    reader.read_exact(&mut len)?;
    let len = u64::from(u32::from_le_bytes(len));
    // The checksum only says the file is as its writer made it, not that the writer was ours:
    // a length is believed only when it fits the file and a header (ids and a membership).
    if len > MAX_SNAPSHOT_HEADER.min(body_len) {
        return Err(invalid(format!(
            "{}: a header of {len} bytes, over the {MAX_SNAPSHOT_HEADER} a snapshot header may have",
            path.display()
        )));
    }
    let mut header = vec![0u8; len as usize];
    reader.read_exact(&mut header)?;
    let meta = postcard::from_bytes(&header).map_err(invalid)?;
    Ok((meta, reader))
}

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes through to `inner` while hashing and counting what passes.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        Self { inner, hasher: Sha256::new(), written: 0 }
    }
    fn finish(self) -> (W, [u8; 32]) {
        (self.inner, self.hasher.finalize().into())
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use openraft::vote::RaftLeaderId;
    use prost::Message;

    use super::*;
    use crate::proto::etcdserverpb::{DeleteRangeRequest, PutRequest, RangeRequest};
    use crate::raft::types::Command;

    /// The race chaos-ci found: a build of index 2000 ends after the leader's snapshot of
    /// index 2238 was installed (and the log up to 2238 purged). The late build must not
    /// take its place, or the member could not start again.
    #[test]
    fn a_snapshot_kept_late_never_replaces_a_newer_one() {
        let dir = tempfile::tempdir().expect("dir");
        let snapshots = SnapshotDir::create(dir.path().join("snap")).expect("snapshot dir");
        let leader =
            <openraft::type_config::alias::LeaderIdOf<TypeConfig> as RaftLeaderId>::new(3, 1).to_committed();
        let meta =
            |index| SnapshotMeta { last_log_id: Some(LogId::new(leader, index)), ..SnapshotMeta::default() };
        let marked_now = || marked(&snapshots.newest().expect("newest").expect("a marker")).expect("marker");

        let installed = match snapshots.mark(&meta(2238)).expect("mark") {
            Kept::Current => snapshots.newest().expect("newest").expect("a marker"),
            Kept::Superseded(newer) => panic!("nothing was newer than 2238, yet {newer:?}"),
        };
        match snapshots.mark(&meta(2000)).expect("mark") {
            Kept::Superseded(newer) => assert_eq!(newer, installed),
            Kept::Current => panic!("the build of 2000 replaced the snapshot of 2238"),
        }
        assert_eq!(marked_now(), meta(2238));
        assert_eq!(fs::read_dir(dir.path().join("snap")).expect("list").count(), 1, "no .tmp file left");

        // A build newer than the snapshot replaces it, as always.
        assert!(
            matches!(snapshots.mark(&meta(4000)).expect("mark"), Kept::Current),
            "a newer build was refused"
        );
        assert_eq!(marked_now(), meta(4000));
        assert!(!installed.exists(), "the older snapshot is removed");
    }

    /// A build waits for an install's restore and may then mark the same log id at the same
    /// moment as the install: neither may fail for the other (a failed build stops Raft).
    /// What a crash left of a marker being written goes when the member starts.
    #[test]
    fn two_marks_of_one_log_id_at_once_both_succeed_and_no_partial_marker_stays() {
        let dir = tempfile::tempdir().expect("dir");
        fs::create_dir(dir.path().join("snap")).expect("snap");
        fs::write(dir.path().join("snap/00000000000000000004-1.snap.7.tmp"), b"CNMA").expect("partial");
        let snapshots = SnapshotDir::create(dir.path().join("snap")).expect("snapshot dir");
        let leader =
            <openraft::type_config::alias::LeaderIdOf<TypeConfig> as RaftLeaderId>::new(1, 1).to_committed();
        let meta = SnapshotMeta { last_log_id: Some(LogId::new(leader, 5)), ..SnapshotMeta::default() };
        std::thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    for _ in 0..200 {
                        snapshots.mark(&meta).expect("mark");
                    }
                });
            }
        });
        assert_eq!(marked(&snapshots.newest().expect("newest").expect("a marker")).expect("marker"), meta);
        assert_eq!(fs::read_dir(&snapshots.path).expect("list").count(), 1, "no .tmp file left");
    }

    /// A member kept a copy of the store as its snapshot before markers; that file still says
    /// what the store is durable up to. A marker is never taken for a snapshot file: restoring
    /// it would empty the store.
    #[tokio::test]
    async fn a_snapshot_file_kept_before_markers_counts_as_one_and_a_marker_is_no_snapshot_file() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Arc::new(MvccStore::open(&dir.path().join("db")).expect("open"));
        let snapshots = SnapshotDir::create(dir.path().join("snap")).expect("snapshot dir");
        let leader =
            <openraft::type_config::alias::LeaderIdOf<TypeConfig> as RaftLeaderId>::new(2, 1).to_committed();
        let meta = SnapshotMeta { last_log_id: Some(LogId::new(leader, 77)), ..SnapshotMeta::default() };
        let old = snapshots.path.join(snapshot_file_name(&meta));
        write_snapshot(&store.read().expect("read"), &meta, File::create(&old).expect("create"))
            .expect("write");
        let mut state_machine = StateMachine::new(
            store,
            snapshots.path.clone(),
            Metrics::new(1, "test"),
            Arc::default(),
            WatchHub::new(),
        )
        .expect("state machine");
        let current = state_machine.get_current_snapshot().await.expect("read").expect("a snapshot");
        assert_eq!(current.meta, meta);
        assert!(matches!(current.snapshot, SnapshotData::Store));

        let Kept::Current = snapshots.mark(&meta).expect("mark") else { panic!("not kept") };
        let marker = snapshots.newest().expect("newest").expect("the marker");
        assert_eq!(marked(&marker).expect("marker"), meta);
        let refused = open_snapshot(&marker).err().expect("a marker is not a snapshot file");
        assert!(refused.to_string().contains("not a consensus-node snapshot"), "{refused}");
    }

    /// The keys of a copy of the store file taken now: what a crash would leave on disk.
    fn keys_on_disk(store: &Path, scratch: &Path) -> Vec<Vec<u8>> {
        let crashed = MvccStore::open_crash_copy(store, scratch);
        let view = crashed.read().expect("read");
        let everything =
            RangeRequest { key: vec![0], range_end: vec![0], keys_only: true, ..RangeRequest::default() };
        crate::kv::range(&view, &everything).expect("range").kvs.into_iter().map(|kv| kv.key).collect()
    }

    #[tokio::test]
    async fn only_a_batch_holding_a_request_that_changes_many_keys_commits_durably() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("db");
        let store = Arc::new(MvccStore::open(&path).expect("open"));
        let metrics = Metrics::new(1, "test");
        let mut state_machine = StateMachine::new(
            store,
            dir.path().join("snap"),
            metrics,
            Arc::new(AtomicU64::new(0)),
            WatchHub::new(),
        )
        .expect("state machine");
        let leader =
            <openraft::type_config::alias::LeaderIdOf<TypeConfig> as RaftLeaderId>::new(1, 1).to_committed();
        let entry = |index: u64, command: Command| -> io::Result<EntryResponder<TypeConfig>> {
            Ok((
                crate::raft::types::Entry {
                    log_id: LogId::new(leader, index),
                    payload: EntryPayload::Normal(command),
                },
                None,
            ))
        };
        let put = |key: String| {
            Command::Put(PutRequest { key: key.into_bytes(), ..PutRequest::default() }.encode_to_vec())
        };
        // One batch of 4,096 one-key puts: many keys, no large request.
        let puts: Vec<_> =
            (0..LARGE_REQUEST_KEYS).map(|i| entry(i as u64 + 1, put(format!("k/{i:05}")))).collect();
        state_machine.apply(futures::stream::iter(puts)).await.expect("apply");
        assert!(keys_on_disk(&path, dir.path()).is_empty(), "left to the periodic durable commit");
        // One request deleting all of them, and a put after it in the same batch.
        let next = LARGE_REQUEST_KEYS as u64 + 1;
        let delete = Command::DeleteRange(
            DeleteRangeRequest {
                key: b"k/".to_vec(),
                range_end: b"k0".to_vec(),
                ..DeleteRangeRequest::default()
            }
            .encode_to_vec(),
        );
        let batch = vec![entry(next, delete), entry(next + 1, put("last".into()))];
        state_machine.apply(futures::stream::iter(batch)).await.expect("apply");
        assert_eq!(keys_on_disk(&path, dir.path()), [b"last".to_vec()]);
    }

    #[test]
    fn a_snapshot_header_length_past_the_limit_is_refused_before_anything_is_allocated() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("hostile.snap");
        // Our magic, a header length of 4 GiB - 1, and a checksum that matches: the file is
        // intact, only its writer was not ours.
        let mut body = MAGIC.to_vec();
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        body.extend_from_slice(&[0u8; 64]);
        let digest = Sha256::digest(&body);
        body.extend_from_slice(&digest);
        fs::write(&path, &body).expect("write");
        let refused = open_snapshot(&path).err().expect("refused");
        assert_eq!(refused.kind(), io::ErrorKind::InvalidData);
        assert!(refused.to_string().contains("a header of 4294967295 bytes"), "{refused}");
    }
}
