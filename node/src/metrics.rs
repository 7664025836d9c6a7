//! Prometheus metrics under etcd's names, types and buckets, so etcd's dashboards and
//! alerts work against our members unchanged.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::storage::wal::WalMetrics;

type Labels = Vec<(String, String)>;

struct Inner {
    registry: Registry,
    has_leader: Gauge,
    is_leader: Gauge,
    is_learner: Gauge,
    leader_changes: Counter,
    proposals_committed: Gauge,
    proposals_applied: Gauge,
    proposals_pending: Gauge,
    proposals_failed: Counter,
    wal_fsync: Histogram,
    wal_write_bytes: Gauge,
    backend_commit: Histogram,
    backend_snapshot: Histogram,
    peer_round_trip: Family<Labels, Histogram>,
    apply_stage: Family<Labels, Histogram>,
    write_stage: Family<Labels, Histogram>,
    /// When each batch of entries still to be committed went to the log: (its first index,
    /// when). Oldest first.
    appended: Mutex<VecDeque<(u64, Instant)>>,
    db_total_size: Gauge,
}

/// Batches remembered for `WriteStage::Commit`: a member that appends but does not apply
/// (a learner cut off from the leader's commit index) must not grow this without bound.
const APPENDED_BATCHES_KEPT: usize = 4096;

/// Where a batch of committed entries spends its time in the state machine.
#[derive(Clone, Copy, Debug)]
pub enum ApplyStage {
    /// Waiting for the store's write transaction, which a reader committing the earlier
    /// batches, a durable commit, a snapshot restore or a defragmentation may hold.
    Wait,
    /// Applying the entries.
    Apply,
    /// Committing them, which a batch that may take long does itself (durably if it holds a
    /// request that changes many keys); a batch of puts leaves it to the next read or durable
    /// commit (`MvccStore::applying`).
    Commit,
}

/// Where a write spends its time, from the log's point of view and the client's.
#[derive(Clone, Copy, Debug)]
pub enum WriteStage {
    /// From appending a batch of entries to the log until it is fdatasync'ed.
    Persist,
    /// From appending a batch of entries to the log until its first entry is handed to the
    /// state machine, committed on a quorum.
    Commit,
    /// On the leader, from proposing a write until its answer: waiting in openraft's core
    /// for the log, `persist`, `commit` and applying.
    Propose,
    /// On the member a client sent a write to, until it answers: `propose`, and the forward
    /// to the leader when this member is not the leader.
    Request,
}

impl WriteStage {
    fn label(self) -> &'static str {
        match self {
            WriteStage::Persist => "persist",
            WriteStage::Commit => "commit",
            WriteStage::Propose => "propose",
            WriteStage::Request => "request",
        }
    }
}

impl ApplyStage {
    fn label(self) -> &'static str {
        match self {
            ApplyStage::Wait => "wait",
            ApplyStage::Apply => "apply",
            ApplyStage::Commit => "commit",
        }
    }
}

/// Cheap to clone; every clone updates the same registry.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

fn peer_round_trip_histogram() -> Histogram {
    // etcd: prometheus.ExponentialBuckets(0.0001, 2, 16)
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// One observation in the `stage` series of a histogram family labelled by stage.
fn observe_stage(family: &Family<Labels, Histogram>, stage: &str, took: Duration) {
    family.get_or_create(&vec![("stage".into(), stage.into())]).observe(took.as_secs_f64());
}

/// 100 µs to 26 s: a large DeleteRange takes seconds to apply, and a write may wait for one.
fn stage_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 19))
}

impl Metrics {
    pub fn new(member_id: u64, version: &str) -> Self {
        let mut registry = Registry::default();
        let has_leader = Gauge::default();
        let is_leader = Gauge::default();
        let is_learner = Gauge::default();
        let leader_changes = Counter::default();
        let proposals_committed = Gauge::default();
        let proposals_applied = Gauge::default();
        let proposals_pending = Gauge::default();
        let proposals_failed = Counter::default();
        // etcd: prometheus.ExponentialBuckets(0.001, 2, 14) for WAL fsync and backend commit,
        // (0.01, 2, 17) for backend snapshots.
        let wal_fsync = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        let wal_write_bytes = Gauge::default();
        let backend_commit = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        let backend_snapshot = Histogram::new(exponential_buckets(0.01, 2.0, 17));
        let peer_round_trip =
            Family::<Labels, Histogram>::new_with_constructor(peer_round_trip_histogram as fn() -> _);
        let apply_stage = Family::<Labels, Histogram>::new_with_constructor(stage_histogram as fn() -> _);
        let write_stage = Family::<Labels, Histogram>::new_with_constructor(stage_histogram as fn() -> _);
        let db_total_size = Gauge::default();
        let server_id = Family::<Labels, Gauge>::default();
        server_id.get_or_create(&vec![("server_id".into(), format!("{member_id:x}"))]).set(1);
        let server_version = Family::<Labels, Gauge>::default();
        server_version.get_or_create(&vec![("server_version".into(), version.into())]).set(1);

        let r = &mut registry;
        r.register(
            "etcd_server_has_leader",
            "Whether or not a leader exists. 1 is existence, 0 is not.",
            has_leader.clone(),
        );
        r.register(
            "etcd_server_is_leader",
            "Whether or not this member is a leader. 1 if is, 0 otherwise.",
            is_leader.clone(),
        );
        r.register(
            "etcd_server_is_learner",
            "Whether or not this member is a learner. 1 if is, 0 otherwise.",
            is_learner.clone(),
        );
        // prometheus-client appends `_total` to counters.
        r.register(
            "etcd_server_leader_changes_seen",
            "The number of leader changes seen.",
            leader_changes.clone(),
        );
        r.register(
            "etcd_server_proposals_committed_total",
            "The total number of consensus proposals committed.",
            proposals_committed.clone(),
        );
        r.register(
            "etcd_server_proposals_applied_total",
            "The total number of consensus proposals applied.",
            proposals_applied.clone(),
        );
        r.register(
            "etcd_server_proposals_pending",
            "The current number of pending proposals to commit.",
            proposals_pending.clone(),
        );
        r.register(
            "etcd_server_proposals_failed",
            "The total number of failed proposals seen.",
            proposals_failed.clone(),
        );
        r.register(
            "etcd_disk_wal_fsync_duration_seconds",
            "The latency distributions of fsync called by WAL.",
            wal_fsync.clone(),
        );
        r.register(
            "etcd_disk_wal_write_bytes_total",
            "Total number of bytes written in WAL.",
            wal_write_bytes.clone(),
        );
        r.register(
            "etcd_disk_backend_commit_duration_seconds",
            "The latency distributions of commit called by backend.",
            backend_commit.clone(),
        );
        r.register(
            "etcd_disk_backend_snapshot_duration_seconds",
            "The latency distribution of backend snapshots.",
            backend_snapshot.clone(),
        );
        r.register(
            "etcd_network_peer_round_trip_time_seconds",
            "Round-Trip-Time histogram between peers",
            peer_round_trip.clone(),
        );
        // Ours, not etcd's: where applying committed entries spends its time.
        r.register(
            "consensus_apply_duration_seconds",
            "Time per batch of committed entries in the state machine, by stage: wait (for the store's write \
             transaction), apply, commit.",
            apply_stage.clone(),
        );
        r.register(
            "consensus_write_duration_seconds",
            "Time a write takes, by stage: persist and commit (from appending a batch to the log until it is \
             fdatasync'ed, and until it is committed and handed to the state machine), propose (on the leader, \
             from proposing until the answer), request (on the member the client called, until the answer).",
            write_stage.clone(),
        );
        r.register(
            "etcd_mvcc_db_total_size_in_bytes",
            "Total size of the underlying database physically allocated in bytes.",
            db_total_size.clone(),
        );
        r.register(
            "etcd_server_id",
            "Server or member ID in hexadecimal format. 1 for 'server_id' label with current ID.",
            server_id,
        );
        r.register(
            "etcd_server_version",
            "Which version is running. 1 for 'server_version' label with current version.",
            server_version,
        );

        Self {
            inner: Arc::new(Inner {
                registry,
                has_leader,
                is_leader,
                is_learner,
                leader_changes,
                proposals_committed,
                proposals_applied,
                proposals_pending,
                proposals_failed,
                wal_fsync,
                wal_write_bytes,
                backend_commit,
                backend_snapshot,
                peer_round_trip,
                apply_stage,
                write_stage,
                appended: Mutex::new(VecDeque::new()),
                db_total_size,
            }),
        }
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.inner.registry);
        out
    }

    /// Updates the leadership gauges; counts a change when the known leader differs.
    pub fn observe_leadership(
        &self,
        previous_leader: Option<u64>,
        leader: Option<u64>,
        is_leader: bool,
        is_learner: bool,
    ) {
        self.inner.has_leader.set(i64::from(leader.is_some()));
        self.inner.is_leader.set(i64::from(is_leader));
        self.inner.is_learner.set(i64::from(is_learner));
        if leader.is_some() && leader != previous_leader {
            self.inner.leader_changes.inc();
        }
    }

    pub fn observe_progress(&self, committed: u64, applied: u64) {
        self.inner.proposals_committed.set(committed as i64);
        self.inner.proposals_applied.set(applied as i64);
    }

    pub fn proposal_started(&self) {
        self.inner.proposals_pending.inc();
    }

    pub fn proposal_finished(&self, failed: bool) {
        self.inner.proposals_pending.dec();
        if failed {
            self.inner.proposals_failed.inc();
        }
    }

    pub fn backend_commit(&self, took: Duration) {
        self.inner.backend_commit.observe(took.as_secs_f64());
    }

    pub fn apply_stage(&self, stage: ApplyStage, took: Duration) {
        observe_stage(&self.inner.apply_stage, stage.label(), took);
    }

    pub fn write_stage(&self, stage: WriteStage, took: Duration) {
        observe_stage(&self.inner.write_stage, stage.label(), took);
    }

    fn appended(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, Instant)>> {
        self.inner.appended.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A batch of entries from `first_index` on went to the log now: its `commit` stage
    /// starts. Returns when, for its `persist` stage.
    pub fn log_appended(&self, first_index: u64) -> Instant {
        let now = Instant::now();
        let mut appended = self.appended();
        if appended.len() == APPENDED_BATCHES_KEPT {
            appended.pop_front();
        }
        appended.push_back((first_index, now));
        now
    }

    /// Entries from `from` on were cut from the log: they will never be committed.
    pub fn log_truncated(&self, from: u64) {
        self.appended().retain(|(first, _)| *first < from);
    }

    /// The state machine was handed committed entries up to `last_index`: each batch whose
    /// first entry is among them ends its `commit` stage.
    pub fn log_committed(&self, last_index: u64) {
        let now = Instant::now();
        let mut appended = self.appended();
        while let Some((_, when)) = appended.front().filter(|(first, _)| *first <= last_index) {
            self.write_stage(WriteStage::Commit, now.saturating_duration_since(*when));
            appended.pop_front();
        }
    }

    /// A snapshot replaced everything up to `last_index`: those entries were not committed
    /// through this member's log.
    pub fn log_replaced(&self, last_index: u64) {
        self.appended().retain(|(first, _)| *first > last_index);
    }

    pub fn backend_snapshot(&self, took: Duration) {
        self.inner.backend_snapshot.observe(took.as_secs_f64());
    }

    /// Labelled, as etcd's, by the peer's member id in hex.
    pub fn peer_round_trip(&self, to: u64, took: Duration) {
        self.peer_histogram(to).observe(took.as_secs_f64());
    }

    /// Exposes an (empty) round-trip histogram for `peer`, so every member shows the
    /// metric from the start, leader or not.
    pub fn add_peer(&self, peer: u64) {
        self.peer_histogram(peer);
    }

    fn peer_histogram(&self, peer: u64) -> Histogram {
        self.inner.peer_round_trip.get_or_create(&vec![("To".into(), format!("{peer:x}"))]).clone()
    }

    /// Bytes written to the WAL since start (`etcd_disk_wal_write_bytes_total`).
    pub fn wal_bytes_written(&self) -> u64 {
        self.inner.wal_write_bytes.get().max(0) as u64
    }

    pub fn db_size(&self, bytes: u64) {
        self.inner.db_total_size.set(bytes as i64);
    }
}

impl WalMetrics for Metrics {
    fn fsync(&self, took: Duration) {
        self.inner.wal_fsync.observe(took.as_secs_f64());
    }

    fn wrote(&self, bytes: u64) {
        self.inner.wal_write_bytes.inc_by(bytes as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commits(metrics: &Metrics) -> u64 {
        let text = metrics.render();
        let line =
            text.lines().find(|l| l.starts_with("consensus_write_duration_seconds_count{stage=\"commit\"}"));
        line.map_or(0, |l| l.rsplit(' ').next().and_then(|n| n.parse().ok()).expect("a count"))
    }

    /// A batch ends its commit stage once, when its first entry is committed; batches cut
    /// from the log or replaced by a snapshot never do.
    #[test]
    fn a_batch_is_committed_once_unless_cut_or_replaced() {
        let metrics = Metrics::new(1, "test");
        for first in [1, 4, 8] {
            metrics.log_appended(first);
        }
        metrics.log_committed(5);
        assert_eq!(commits(&metrics), 2, "the batches from 1 and 4");
        metrics.log_committed(6);
        assert_eq!(commits(&metrics), 2, "none starts at 5 or 6");

        metrics.log_truncated(8);
        metrics.log_appended(8);
        metrics.log_appended(10);
        metrics.log_replaced(9);
        metrics.log_committed(20);
        assert_eq!(commits(&metrics), 3, "only the batch from 10: 8 was cut, its successor replaced");

        for first in 100..100 + APPENDED_BATCHES_KEPT as u64 + 10 {
            metrics.log_appended(first);
        }
        metrics.log_committed(u64::MAX);
        assert_eq!(commits(&metrics), 3 + APPENDED_BATCHES_KEPT as u64, "the oldest are let go");
    }
}
