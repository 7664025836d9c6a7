//! The metrics port: etcd's metric names, types and values, and etcd's health answer.

mod support;

use consensus_node::proto::etcdserverpb::DeleteRangeRequest;
use support::*;

/// The value of an unlabelled sample `name` in an OpenMetrics exposition.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

const METRICS: [(&str, &str); 16] = [
    ("etcd_server_has_leader", "gauge"),
    ("etcd_server_is_leader", "gauge"),
    ("etcd_server_leader_changes_seen", "counter"),
    ("etcd_server_is_learner", "gauge"),
    ("etcd_server_proposals_committed_total", "gauge"),
    ("etcd_server_proposals_applied_total", "gauge"),
    ("etcd_server_proposals_pending", "gauge"),
    ("etcd_server_proposals_failed", "counter"),
    ("etcd_disk_wal_fsync_duration_seconds", "histogram"),
    ("etcd_disk_wal_write_bytes_total", "gauge"),
    ("etcd_disk_backend_commit_duration_seconds", "histogram"),
    ("etcd_disk_backend_snapshot_duration_seconds", "histogram"),
    ("etcd_network_peer_round_trip_time_seconds", "histogram"),
    ("etcd_mvcc_db_total_size_in_bytes", "gauge"),
    ("etcd_server_id", "gauge"),
    ("etcd_server_version", "gauge"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_expose_etcds_metrics_and_health() {
    let cluster = TestCluster::start(3);
    let leader = cluster.leader().await;
    for member in &cluster.members {
        let text = eventually("has_leader 1 on every member", || async {
            let text = metrics_text(member).await?;
            (sample(&text, "etcd_server_has_leader") == Some(1.0)).then_some(text)
        })
        .await;
        for (name, kind) in METRICS {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{} lacks {name} ({kind})",
                member.name
            );
        }
        // Counters carry OpenMetrics' `_total` suffix on their samples.
        assert!(text.contains("etcd_server_leader_changes_seen_total "), "{text}");
        let health =
            http_get(&format!("{}/health", member.metrics_url())).await.expect("/health answers 200");
        assert_eq!(health, r#"{"health":"true","reason":""}"#);
        assert!(http_get(&format!("{}/readyz", member.metrics_url())).await.is_some());
        assert!(http_get(&format!("{}/livez", member.metrics_url())).await.is_some());
    }
    let is_leader: Vec<f64> = {
        let mut values = Vec::new();
        for member in &cluster.members {
            let text = metrics_text(member).await.expect("metrics");
            values.push(sample(&text, "etcd_server_is_leader").expect("is_leader"));
        }
        values
    };
    assert_eq!(is_leader.iter().sum::<f64>(), 1.0);
    assert_eq!(is_leader[leader], 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fsync_histogram_counts_real_fsyncs() {
    let cluster = TestCluster::start(1);
    cluster.leader().await;
    let member = &cluster.members[0];
    let count = |text: &str| sample(text, "etcd_disk_wal_fsync_duration_seconds_count").expect("fsync count");
    let before = count(&metrics_text(member).await.expect("metrics"));
    for i in 0..20 {
        eventually("a write", || async { put(member, &format!("k{i}"), "v").await.ok() }).await;
    }
    let text = metrics_text(member).await.expect("metrics");
    // One client at a time: every acknowledged write waited for its own fsync.
    assert!(count(&text) >= before + 20.0, "fsyncs {before} -> {}", count(&text));
    assert!(sample(&text, "etcd_disk_wal_write_bytes_total").expect("bytes") > 0.0);
    assert!(sample(&text, "etcd_server_proposals_applied_total").expect("applied") >= 20.0);
}

/// Every applied batch is counted once in each stage of `consensus_apply_duration_seconds`
/// it goes through: puts leave their commit to whatever needs it, which
/// `etcd_disk_backend_commit_duration_seconds` counts, and a DeleteRange commits at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_applied_batch_is_timed_by_stage() {
    let cluster = TestCluster::start(1);
    let member = &cluster.members[cluster.leader().await];
    // The member publishes its client URLs through the log: after that, the window below
    // holds the writes alone.
    cluster.published(member).await;
    let count = |text: &str, stage: &str| {
        sample(text, &format!("consensus_apply_duration_seconds_count{{stage=\"{stage}\"}}")).unwrap_or(0.0)
    };
    let commits = |text: &str| sample(text, "etcd_disk_backend_commit_duration_seconds_count").unwrap_or(0.0);
    let before = metrics_text(member).await.expect("metrics");
    for i in 0..10 {
        eventually("a write", || async { put(member, &format!("k{i}"), "v").await.ok() }).await;
    }
    let text = metrics_text(member).await.expect("metrics");
    assert!(text.contains("# TYPE consensus_apply_duration_seconds histogram\n"), "{text}");
    // One client at a time: each write was applied in a batch of its own.
    for stage in ["wait", "apply"] {
        let batches = count(&text, stage) - count(&before, stage);
        assert!(batches >= 10.0, "{stage}: {batches} batches for 10 writes");
    }
    assert_eq!(count(&text, "commit"), count(&before, "commit"), "puts leave their commit");

    // A read sees them, and a DeleteRange commits its own batch.
    let committed = commits(&metrics_text(member).await.expect("metrics"));
    assert_eq!(get(member, "k9", false).await.expect("get"), Some(b"v".to_vec()));
    let delete =
        DeleteRangeRequest { key: b"k".to_vec(), range_end: b"l".to_vec(), ..DeleteRangeRequest::default() };
    assert_eq!(member.kv().await.delete_range(delete).await.expect("delete").into_inner().deleted, 10);
    let text = metrics_text(member).await.expect("metrics");
    assert_eq!(count(&text, "commit") - count(&before, "commit"), 1.0, "the DeleteRange's batch");
    // The puts' commit may have come from the periodic durable commit before the read.
    assert!(commits(&text) > committed, "backend commits {committed} -> {}", commits(&text));
}

/// `consensus_write_duration_seconds`: each write is timed by stage on the members that saw
/// it, and the stages nest as their names say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_write_is_timed_by_stage_where_it_passes() {
    let cluster = TestCluster::start(3);
    let leader = &cluster.members[cluster.leader().await];
    let follower = cluster.members.iter().find(|m| m.name != leader.name).expect("a follower");
    let stage = |text: &str, stage: &str, part: &str| {
        sample(text, &format!("consensus_write_duration_seconds_{part}{{stage=\"{stage}\"}}")).unwrap_or(0.0)
    };
    let text = |member| async move { metrics_text(member).await.expect("metrics") };
    // Members publish their client URLs through the log once a leader is known. The leader
    // lists them once it has applied them, and with them its blank entry before them: after
    // that, the window below holds the ten writes alone.
    cluster.published(leader).await;

    let (leader_before, follower_before) = (text(leader).await, text(follower).await);
    for i in 0..10 {
        eventually("a write to the leader", || async { put(leader, &format!("l{i}"), "v").await.ok() }).await;
    }
    let (leader_after, follower_after) = (text(leader).await, text(follower).await);
    assert!(leader_after.contains("# TYPE consensus_write_duration_seconds histogram\n"), "{leader_after}");
    let delta = |before: &str, after: &str, name: &str, part: &str| {
        stage(after, name, part) - stage(before, name, part)
    };
    // One client at a time: the leader appended each write as a batch of its own.
    for name in ["persist", "commit", "propose", "request"] {
        let writes = delta(&leader_before, &leader_after, name, "count");
        assert!(writes >= 10.0, "leader, {name}: {writes} of 10 writes");
    }
    // A follower that falls behind takes several writes in one batch, and learns the last
    // one is committed only from the leader's next message.
    for name in ["persist", "commit"] {
        let batches = delta(&follower_before, &follower_after, name, "count");
        assert!(batches >= 1.0, "follower, {name}: {batches} batches for 10 writes");
    }
    // A proposal's time holds its entry's append to commit, and a request's its proposal.
    let took = |name| delta(&leader_before, &leader_after, name, "sum");
    assert!(took("propose") >= took("commit"), "propose {} < commit {}", took("propose"), took("commit"));
    assert!(took("request") >= took("propose"), "request {} < propose {}", took("request"), took("propose"));

    // A write sent to a follower is a request there and a proposal on the leader.
    let (leader_before, follower_before) = (leader_after, follower_after);
    for i in 0..10 {
        eventually("a write to a follower", || async { put(follower, &format!("f{i}"), "v").await.ok() })
            .await;
    }
    let (leader_after, follower_after) = (text(leader).await, text(follower).await);
    let requests = delta(&follower_before, &follower_after, "request", "count");
    assert!(requests >= 10.0, "follower: {requests} requests for 10 writes");
    assert_eq!(
        delta(&follower_before, &follower_after, "propose", "count"),
        0.0,
        "a follower proposes nothing"
    );
    let proposals = delta(&leader_before, &leader_after, "propose", "count");
    assert!(proposals >= 10.0, "leader: {proposals} proposals for 10 forwarded writes");
    let (forwarded, proposed) = (
        delta(&follower_before, &follower_after, "request", "sum"),
        delta(&leader_before, &leader_after, "propose", "sum"),
    );
    assert!(forwarded >= proposed, "forwarded writes took {forwarded} s, their proposals {proposed} s");
}
