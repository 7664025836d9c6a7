//! The backend quota and the NOSPACE alarm, through Debian's etcdctl (3.4).

mod support;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_refuses_writes_serves_reads_and_recovers_once_space_is_freed() {
    let quota = 6u64 << 20;
    let cluster = TestCluster::start_with(3, Options { quota_backend_bytes: quota, ..Options::default() });
    cluster.leader().await;
    let endpoints = cluster.endpoints();
    ok(cluster.etcdctl(&endpoints, &["put", "kept", "x"]));

    // One argument may hold at most 128 KiB.
    let big = "v".repeat(100 * 1024);
    let mut written = 0;
    let refusal = eventually("a put to be refused for lack of space", || {
        written += 1;
        let output = cluster.etcdctl(&endpoints, &["put", &format!("big/{written}"), &big]);
        async move { (!output.status.success()).then(|| String::from_utf8_lossy(&output.stderr).into_owned()) }
    })
    .await;
    assert!(refusal.contains("etcdserver: mvcc: database space exceeded"), "{refusal}");
    assert!(written > 1, "the store took writes until it was full");

    // Every member refuses, reads go on, and the alarm is visible.
    for member in &cluster.members {
        let refused = failed(cluster.etcdctl(&member.endpoint(), &["put", "small", "y"]));
        assert!(refused.contains("database space exceeded"), "{refused}");
        let lease = failed(cluster.etcdctl(&member.endpoint(), &["lease", "grant", "60"]));
        assert!(lease.contains("database space exceeded"), "{lease}");
        assert_eq!(
            ok(cluster.etcdctl(&member.endpoint(), &["get", "kept", "--print-value-only"])).trim(),
            "x"
        );
    }
    let alarms = ok(cluster.etcdctl(&endpoints, &["alarm", "list"]));
    assert!(alarms.contains("alarm:NOSPACE"), "{alarms}");

    // The way out etcd documents: delete, compact, defragment, disarm.
    ok(cluster.etcdctl(&endpoints, &["del", "big/", "--prefix"]));
    let status: serde_json::Value =
        serde_json::from_str(&ok(cluster.etcdctl(&endpoints, &["get", "kept", "-w", "json"]))).expect("json");
    let revision = status["header"]["revision"].as_i64().expect("revision");
    ok(cluster.etcdctl(&endpoints, &["compact", &revision.to_string(), "--physical"]));
    for member in &cluster.members {
        ok(cluster.etcdctl(&member.endpoint(), &["defrag"]));
    }
    ok(cluster.etcdctl(&endpoints, &["alarm", "disarm"]));
    assert_eq!(ok(cluster.etcdctl(&endpoints, &["alarm", "list"])).trim(), "");
    ok(cluster.etcdctl(&endpoints, &["put", "small", "y"]));
    assert_eq!(ok(cluster.etcdctl(&endpoints, &["get", "small", "--print-value-only"])).trim(), "y");
}

/// Space freed by compaction is reused while the member runs, without defragmentation: redb
/// reuses a page that was on disk at its last durable commit only after the next one, and
/// applies commit without fsync, so without durable commits of their own a store only grew
/// between snapshots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn space_freed_by_compaction_is_reused_without_defragmenting() {
    let mut cluster = TestCluster::start(1);
    cluster.leader().await;
    let endpoints = cluster.endpoints();
    // 64 values of 60 KiB: each takes a 64 KiB page of its own.
    let value = "v".repeat(60 * 1024);
    let fill = |cluster: &TestCluster| {
        for i in 0..64 {
            ok(cluster.etcdctl(&endpoints, &["put", &format!("k{i:02}"), &value]));
        }
    };
    fill(&cluster);
    in_use_once_durable(&mut cluster).await;
    fill(&cluster);
    let full = in_use_once_durable(&mut cluster).await;
    let status: serde_json::Value =
        serde_json::from_str(&ok(cluster.etcdctl(&endpoints, &["get", "k00", "-w", "json"]))).expect("json");
    let revision = status["header"]["revision"].as_i64().expect("revision");
    // The first 64 values are history now; compaction frees their 4 MiB.
    ok(cluster.etcdctl(&endpoints, &["compact", &revision.to_string()]));
    let member = &cluster.members[0];
    let freed = eventually("the compacted values' pages to be free", || async {
        member.status().await.map(|s| s.db_size_in_use).filter(|&now| now + (3 << 20) < full)
    })
    .await;
    // And reused: writing as much again takes the freed pages instead of growing the store.
    fill(&cluster);
    let refilled = in_use_once_durable(&mut cluster).await;
    assert!(
        refilled < full + (1 << 20),
        "{full} bytes in use before the compaction, {freed} after, {refilled} refilled"
    );
}

/// The store's bytes in use once everything written is durable. redb counts the pages of a
/// commit made without fsync only from the next durable commit, up to a second later, so
/// the member is stopped, which makes its store durable, and started again.
async fn in_use_once_durable(cluster: &mut TestCluster) -> i64 {
    cluster.members[0].terminate();
    cluster.members[0].restart();
    cluster.leader().await;
    cluster.members[0].status().await.expect("status").db_size_in_use
}

/// etcd's `dbSize` is the space its file takes. redb doubles the file's length when it grows
/// and writes the new half only as it uses it, so the length may be twice the store; the
/// status (and the quota) count the blocks the file holds instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_size_is_the_space_the_file_takes_not_its_length() {
    let cluster = TestCluster::start(1);
    cluster.leader().await;
    let endpoints = cluster.endpoints();
    let member = &cluster.members[0];
    let file = member.data_dir.join("member/kv.redb");
    let length = || std::fs::metadata(&file).expect("the store's file").len();
    let value = "v".repeat(60 * 1024);
    let before = length();
    let mut puts = 0u64;
    // Until the file grows: the part it grew by is then mostly unwritten.
    while length() == before {
        ok(cluster.etcdctl(&endpoints, &["put", &format!("k{puts}"), &value]));
        puts += 1;
        assert!(puts < 2000, "the file never grew from {before} bytes");
    }
    // The values reach the file with the store's next durable commit (within a second), as
    // etcd's size follows its backend's commits.
    let written = (puts * 60 * 1024) as i64;
    let size = eventually("the values written to be counted", || async {
        member.status().await.map(|s| s.db_size).filter(|&size| size >= written)
    })
    .await;
    let grown = length();
    assert!(
        size < grown as i64,
        "{size} bytes reported for a file of {grown}, after {puts} values of 60 KiB"
    );
}
