//! Consensus glue over openraft: type configuration, log storage, state machine, network.

pub mod log_store;
pub mod network;
pub mod state_machine;
pub mod types;

use std::sync::Arc;
use std::time::Duration;

use openraft::storage::RaftLogStorage;

use self::log_store::LogStore;
use self::network::PeerNetwork;
use self::state_machine::StateMachine;
use self::types::Raft;

/// Starts openraft as member `id` over `log_store` and `state_machine`, after making sure a
/// snapshot covers whatever the store applied past the log (`snapshot_if_ahead_of`).
pub async fn start(
    id: u64,
    config: Arc<openraft::Config>,
    network: PeerNetwork,
    mut log_store: LogStore,
    mut state_machine: StateMachine,
) -> anyhow::Result<Raft> {
    let log_end = log_store.get_log_state().await?.last_log_id;
    state_machine.snapshot_if_ahead_of(log_end).await?;
    Ok(Raft::new(id, config, network, log_store, state_machine).await?)
}

/// openraft's `(election_timeout_min, election_timeout_max)` in milliseconds for etcd's
/// `--election-timeout` E and `--heartbeat-interval` (E at least five heartbeats, as `run`
/// checks, and as etcd does), chosen so that a leader's followers stand for election as soon
/// as etcd's do on average.
///
/// etcd counts its timeout, drawn from `[E, 2E)` in whole ticks of one heartbeat, from the
/// first tick after the last heartbeat: it stands half a heartbeat before the draw on average,
/// and of a leader's two followers the first stands after about `4E/3 - hb/2`. An openraft
/// follower waits out the leader lease, which openraft fixes at `max`, then a timeout drawn
/// from `[min, max)`, and notices at the next tick, half a heartbeat later on average: the
/// first of two stands after `max + min + (max - min)/3 + hb/2`.
///
/// `min` is half of E, because openraft also gives each vote and pre-vote request `min` to be
/// answered, and a vote is answered only once the voter's hard state is fsync'ed. At one and
/// a half heartbeats (75 ms in the chaos harness) a loaded machine answered no vote in time,
/// and five members stood for election for over 30 s without electing anyone (CI,
/// `make chaos-ci`, the five-member run). `max` then makes the two averages equal:
/// `3(E - hb)/4`, a window of `[5E/4 - 3hb/4, 3E/2 - 3hb/2)`. With `max = E` it was
/// `[3E/2, 2E)`, and failover measured 1.26-1.39x etcd's (`make bench`, 11 failovers each).
///
/// The shorter lease only lets a follower vote sooner after its leader went quiet:
/// linearizable reads confirm leadership with a heartbeat round (ReadIndex), never with the
/// lease.
pub fn election_timeouts(election: Duration, heartbeat: Duration) -> (u64, u64) {
    let election = election.as_millis() as u64;
    let heartbeat = heartbeat.as_millis() as u64;
    // Saturating: a heartbeat as long as E gives min >= max, which openraft's validate refuses.
    (election / 2, election.saturating_sub(heartbeat) * 3 / 4)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use openraft::storage::{IOFlushed, RaftSnapshotBuilder, RaftStateMachine};
    use openraft::type_config::TypeConfigExt;
    use openraft::vote::RaftLeaderId;
    use openraft::{EntryPayload, RaftLogReader};
    use prost::Message;

    use super::*;
    use crate::kv::MvccStore;
    use crate::kv::watch::WatchHub;
    use crate::metrics::Metrics;
    use crate::proto::etcdserverpb::PutRequest;
    use crate::raft::network::StoreCopies;
    use crate::raft::types::{Command, Entry, LogId};
    use crate::storage::wal::WalOptions;

    /// What a leader killed with its log's write still queued left behind (chaos-ci, seed 13
    /// of the fsync class): a store durable up to entry 30, a log that ends at 10, and a
    /// snapshot of 6. openraft purges the log up to 30 as it starts and then needs a
    /// snapshot of at least 30; without one it panicked and the member never started again.
    #[tokio::test]
    async fn a_member_whose_store_is_ahead_of_its_log_starts() {
        let dir = tempfile::tempdir().expect("dir");
        let open = |metrics: &Metrics| {
            let log = LogStore::open(&dir.path().join("raft"), WalOptions::default(), metrics.clone())
                .expect("log");
            let store = Arc::new(MvccStore::open(&dir.path().join("kv.redb")).expect("store"));
            let state_machine = StateMachine::new(
                store.clone(),
                dir.path().join("snap"),
                metrics.clone(),
                Arc::new(AtomicU64::new(0)),
                WatchHub::new(),
            )
            .expect("state machine");
            (log, store, state_machine)
        };
        let leader = <openraft::type_config::alias::LeaderIdOf<types::TypeConfig> as RaftLeaderId>::new(1, 1)
            .to_committed();
        let entry = |index: u64| Entry {
            log_id: LogId::new(leader, index),
            payload: EntryPayload::Normal(Command::Put(
                PutRequest { key: format!("k{index}").into_bytes(), ..PutRequest::default() }.encode_to_vec(),
            )),
        };
        let entries = |indexes: std::ops::RangeInclusive<u64>| {
            futures::stream::iter(indexes.map(|i| Ok((entry(i), None))).collect::<Vec<_>>())
        };
        {
            let metrics = Metrics::new(1, "test");
            let (mut log, store, mut state_machine) = open(&metrics);
            let (flushed, written) = types::TypeConfig::oneshot();
            log.append((1..=10).map(entry), IOFlushed::signal(flushed)).await.expect("append");
            written.await.expect("flushed").expect("written");
            state_machine.apply(entries(1..=6)).await.expect("apply");
            state_machine.get_snapshot_builder().await.build_snapshot().await.expect("snapshot");
            state_machine.apply(entries(7..=30)).await.expect("apply");
            store.sync().expect("durable store");
        }

        let metrics = Metrics::new(1, "test");
        let (mut log, store, state_machine) = open(&metrics);
        assert_eq!(log.get_log_state().await.expect("log state").last_log_id, Some(LogId::new(leader, 10)));
        let config = Arc::new(openraft::Config::default().validate().expect("config"));
        let copies = StoreCopies { store, dir: dir.path().to_owned() };
        let raft = start(1, config, PeerNetwork::new(metrics, 7, copies), log.clone(), state_machine)
            .await
            .expect("start");
        raft.wait(Some(Duration::from_secs(10)))
            .snapshot(LogId::new(leader, 30), "a snapshot covers what the store applied")
            .await
            .expect("Raft runs with a snapshot of entry 30");
        assert!(
            log.try_get_log_entries(1..=30).await.expect("read").is_empty(),
            "the log is purged up to 30"
        );
        raft.shutdown().await.expect("shutdown");
    }

    #[test]
    fn followers_stand_for_election_as_soon_as_etcds_on_average() {
        for (election, heartbeat) in [(1000, 100), (500, 50), (5000, 1000), (20, 4), (1000, 1)] {
            let (min, max) =
                election_timeouts(Duration::from_millis(election), Duration::from_millis(heartbeat));
            let config = openraft::Config {
                heartbeat_interval: heartbeat,
                election_timeout_min: min,
                election_timeout_max: max,
                ..openraft::Config::default()
            };
            config.validate().unwrap_or_else(|e| panic!("E={election} hb={heartbeat}: {e}"));
            // Of two followers the first stands, on average, after the lease (max), the
            // first of two draws from [min, max), min + (max - min)/3, and half a tick; etcd's
            // after the first of two draws from [E, 2E), 4E/3, less half a tick.
            let first_of_two = |lease: u64, low: u64, high: u64, tick: f64| {
                lease as f64 + low as f64 + (high - low) as f64 / 3.0 + tick
            };
            let ours = first_of_two(max, min, max, heartbeat as f64 / 2.0);
            let etcds = first_of_two(0, election, 2 * election, -(heartbeat as f64) / 2.0);
            assert!(
                (ours - etcds).abs() <= 0.02 * etcds,
                "E={election} hb={heartbeat}: the first of two followers stands after {ours} ms, etcd's after {etcds}"
            );
            // openraft's deadline for answering a vote request.
            assert!(
                min >= election / 2,
                "E={election} hb={heartbeat}: votes must be answered within {min} ms"
            );
        }
    }
}
