//! Debian's etcdctl (3.4), a client nobody here wrote, against a 3-member cluster.

mod support;

use consensus_node::proto::etcdserverpb::RangeRequest;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_puts_and_gets() {
    let cluster = TestCluster::start(3);
    cluster.leader().await;
    let endpoints = cluster.endpoints();
    assert_eq!(ok(cluster.etcdctl(&endpoints, &["put", "/app/a", "1"])).trim(), "OK");
    ok(cluster.etcdctl(&endpoints, &["put", "/app/b", "2"]));
    ok(cluster.etcdctl(&endpoints, &["put", "/other", "3"]));
    assert_eq!(ok(cluster.etcdctl(&endpoints, &["get", "/app/a", "--print-value-only"])).trim(), "1");
    let prefix = ok(cluster.etcdctl(&endpoints, &["get", "/app/", "--prefix", "--keys-only"]));
    assert_eq!(prefix.split_whitespace().collect::<Vec<_>>(), ["/app/a", "/app/b"]);
    let json: serde_json::Value =
        serde_json::from_str(&ok(cluster.etcdctl(&endpoints, &["get", "/app/", "--prefix", "-w", "json"])))
            .expect("json");
    assert_eq!(json["count"], 2);
    assert_eq!(json["kvs"][0]["version"], 1);
    let first_revision = json["kvs"][0]["mod_revision"].as_i64().expect("revision");
    ok(cluster.etcdctl(&endpoints, &["put", "/app/a", "1b"]));
    let old = ok(cluster.etcdctl(&endpoints, &["get", "/app/a", &format!("--rev={first_revision}")]));
    assert_eq!(old.lines().nth(1), Some("1"), "{old}");
    let limited = ok(cluster.etcdctl(&endpoints, &["get", "/app/", "--prefix", "--limit=1", "--keys-only"]));
    assert_eq!(limited.split_whitespace().collect::<Vec<_>>(), ["/app/a"]);
    // etcdctl 3.4 has no --count-only; etcd's API does. A count-only range counts past
    // its limit and, returning no keys, has no more to return (etcd 3.4 answers the same).
    let counted = cluster.members[0]
        .kv()
        .await
        .range(RangeRequest {
            key: "/app/".into(),
            range_end: "/app0".into(),
            count_only: true,
            limit: 1,
            ..Default::default()
        })
        .await
        .expect("count-only range")
        .into_inner();
    assert_eq!((counted.count, counted.kvs.len(), counted.more), (2, 0, false));
    assert_eq!(ok(cluster.etcdctl(&endpoints, &["del", "/app/", "--prefix"])).trim(), "2");
    // Each member answers for itself.
    for member in &cluster.members {
        assert_eq!(
            ok(cluster.etcdctl(&member.endpoint(), &["get", "/other", "--print-value-only"])).trim(),
            "3"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_reports_members_status_and_health() {
    let cluster = TestCluster::start(3);
    cluster.leader().await;
    let endpoints = cluster.endpoints();
    let list = eventually("every member to publish its client URL", || async {
        let list = stdout(&cluster.etcdctl(&endpoints, &["member", "list"]));
        cluster.members.iter().all(|m| list.contains(&m.client_url())).then_some(list)
    })
    .await;
    assert_eq!(list.lines().count(), 3, "{list}");
    // `--cluster` dials the advertised `http://` URLs, sending them as HTTP/2 :authority.
    let status = ok(cluster.etcdctl(&endpoints, &["endpoint", "status", "--cluster", "-w", "table"]));
    assert_eq!(status.matches("true").count(), 1, "exactly one leader: {status}");
    for member in &cluster.members {
        assert!(status.contains(&member.client_url()), "{status}");
    }
    let health = cluster.etcdctl(&endpoints, &["endpoint", "health", "--cluster"]);
    let text = format!("{}{}", stdout(&health), String::from_utf8_lossy(&health.stderr));
    assert!(health.status.success(), "{text}");
    assert_eq!(text.matches("is healthy").count(), 3, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learners_are_added_promoted_and_removed_and_leadership_moves() {
    let mut cluster = TestCluster::start(3);
    cluster.leader().await;
    let endpoints = cluster.endpoints();
    ok(cluster.etcdctl(&endpoints, &["put", "before-join", "x"]));

    let joiner = cluster.prepare_joiner("m3");
    let peer_url = cluster.members[joiner].peer_url();
    let added = ok(cluster
        .etcdctl(&endpoints, &["member", "add", "m3", "--learner", &format!("--peer-urls={peer_url}")]));
    let id = added
        .split_whitespace()
        .skip_while(|w| *w != "Member")
        .nth(1)
        .expect("member add prints the new ID")
        .to_owned();
    cluster.start_member(joiner);
    let learner = &cluster.members[joiner];
    eventually("the learner to receive the data", || async {
        (get(learner, "before-join", true).await.ok()?.as_deref() == Some(b"x".as_slice())).then_some(())
    })
    .await;
    let list = ok(cluster.etcdctl(&endpoints, &["member", "list"]));
    assert!(list.lines().any(|l| l.contains(&id) && l.trim_end().ends_with("true")), "learner flag: {list}");

    eventually("the learner to be promoted", || async {
        cluster.etcdctl(&endpoints, &["member", "promote", &id]).status.success().then_some(())
    })
    .await;
    let list = ok(cluster.etcdctl(&endpoints, &["member", "list"]));
    assert!(list.lines().any(|l| l.contains(&id) && l.trim_end().ends_with("false")), "promoted: {list}");

    // Leadership moves to the new voter, through the leader.
    let leader = cluster.leader().await;
    ok(cluster.etcdctl(&cluster.members[leader].endpoint(), &["move-leader", &id]));
    assert_eq!(cluster.leader().await, joiner);

    // A voter that is not the leader is removed.
    let removed = (joiner + 1) % cluster.members.len();
    let removed_id = format!(
        "{:x}",
        cluster.members[removed].status().await.expect("status").header.expect("header").member_id
    );
    ok(cluster.etcdctl(&cluster.members[joiner].endpoint(), &["member", "remove", &removed_id]));
    let list = ok(cluster.etcdctl(&cluster.members[joiner].endpoint(), &["member", "list"]));
    assert_eq!(list.lines().count(), 3, "{list}");
    assert!(!list.contains(&removed_id), "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_input_gets_etcds_errors() {
    let cluster = TestCluster::start(1);
    cluster.leader().await;
    let endpoint = cluster.endpoints();
    let promote = cluster.etcdctl(&endpoint, &["member", "promote", "1234"]);
    assert!(!promote.status.success());
    assert!(String::from_utf8_lossy(&promote.stderr).contains("member not found"), "{:?}", promote);
    let lease = cluster.etcdctl(&endpoint, &["put", "k", "v", "--lease=1234"]);
    assert!(String::from_utf8_lossy(&lease.stderr).contains("requested lease not found"), "{:?}", lease);
    let oversized = "v".repeat(1600 * 1024);
    let too_large = failed(etcdctl(&endpoint, &["put", "big"], Some(&oversized)));
    assert!(too_large.contains("etcdserver: request is too large"), "{too_large}");
    let bad_sort = cluster.members[0]
        .kv()
        .await
        .range(RangeRequest { key: "k".into(), sort_target: 42, ..Default::default() })
        .await
        .expect_err("an unknown sort target is refused");
    assert_eq!(bad_sort.code(), tonic::Code::InvalidArgument);
    assert_eq!(bad_sort.message(), "etcdserver: invalid sort option");
    let future = cluster.etcdctl(&endpoint, &["get", "k", "--rev=1000"]);
    assert!(
        String::from_utf8_lossy(&future.stderr).contains("required revision is a future revision"),
        "{:?}",
        future
    );
}
