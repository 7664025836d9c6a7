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
