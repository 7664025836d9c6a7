//! The etcd v3 API through the Rust `etcd-client` crate against a 3-member cluster: KV,
//! Txn, Compact, Watch, Lease, Cluster, Maintenance, and wrong input answered with etcd's
//! gRPC codes and messages as the client sees them.

mod support;

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, EventType, GetOptions, PutOptions, SortOrder, SortTarget, Txn,
    TxnOp, TxnOpResponse, WatchOptions,
};
use support::*;
use tonic::Code;

async fn client(member: &TestMember) -> Client {
    Client::connect([member.endpoint()], None).await.expect("etcd-client connects")
}

/// The gRPC status inside an etcd-client error.
fn status(error: etcd_client::Error) -> tonic::Status {
    match error {
        etcd_client::Error::GRpcStatus(status) => status,
        other => panic!("expected a gRPC status, got {other}"),
    }
}

fn expect_status(error: etcd_client::Error, code: Code, message: &str) {
    let display = error.to_string();
    let status = status(error);
    assert_eq!((status.code(), status.message()), (code, message));
    assert!(display.contains(message), "the client's error shows etcd's message: {display}");
}

fn keys(response: &etcd_client::GetResponse) -> Vec<String> {
    response.kvs().iter().map(|kv| String::from_utf8_lossy(kv.key()).into_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_txn_and_compact() {
    let cluster = TestCluster::start(3);
    cluster.leader().await;
    let mut c = client(&cluster.members[0]).await;
    let mut other = client(&cluster.members[2]).await;

    let first = c.put("fruit/apple", "red", None).await.expect("put").header().expect("header").revision();
    c.put("fruit/banana", "yellow", None).await.expect("put");
    c.put("fruit/cherry", "dark", None).await.expect("put");
    c.put("veg/leek", "green", None).await.expect("put");
    let previous =
        c.put("fruit/apple", "green", Some(PutOptions::new().with_prev_key())).await.expect("put prev_kv");
    assert_eq!(previous.prev_key().expect("prev_kv").value(), b"red");

    // Prefix, from another member (linearizable read).
    let all = other.get("fruit/", Some(GetOptions::new().with_prefix())).await.expect("get");
    assert_eq!(keys(&all), ["fruit/apple", "fruit/banana", "fruit/cherry"]);
    assert_eq!(all.count(), 3);
    assert_eq!(all.kvs()[0].version(), 2);
    // At an earlier revision.
    let old = other.get("fruit/apple", Some(GetOptions::new().with_revision(first))).await.expect("get");
    assert_eq!(old.kvs()[0].value(), b"red");
    // Limit: the first keys and `more`.
    let limited = c.get("fruit/", Some(GetOptions::new().with_prefix().with_limit(2))).await.expect("get");
    assert_eq!(keys(&limited), ["fruit/apple", "fruit/banana"]);
    assert!(limited.more());
    assert_eq!(limited.count(), 3);
    // Keys only, count only.
    let keys_only =
        c.get("fruit/", Some(GetOptions::new().with_prefix().with_keys_only())).await.expect("get");
    assert!(keys_only.kvs().iter().all(|kv| kv.value().is_empty()) && keys_only.kvs().len() == 3);
    let count_only =
        c.get("fruit/", Some(GetOptions::new().with_prefix().with_count_only())).await.expect("get");
    assert!(count_only.kvs().is_empty());
    assert_eq!(count_only.count(), 3);
    // Sorted by value, descending; by modification, ascending.
    let by_value = c
        .get("fruit/", Some(GetOptions::new().with_prefix().with_sort(SortTarget::Value, SortOrder::Descend)))
        .await
        .expect("get");
    assert_eq!(keys(&by_value), ["fruit/banana", "fruit/apple", "fruit/cherry"]);
    let by_mod = c
        .get("fruit/", Some(GetOptions::new().with_prefix().with_sort(SortTarget::Mod, SortOrder::Ascend)))
        .await
        .expect("get");
    assert_eq!(keys(&by_mod), ["fruit/banana", "fruit/cherry", "fruit/apple"]);

    // Delete with prev_kv.
    let deleted = c
        .delete("fruit/b", Some(DeleteOptions::new().with_range("fruit/c").with_prev_key()))
        .await
        .expect("delete");
    assert_eq!(deleted.deleted(), 1);
    assert_eq!(deleted.prev_kvs()[0].value(), b"yellow");

    // Txn: compares on value, version, create and mod revision, lease; nested txn.
    let apple = c.get("fruit/apple", None).await.expect("get").kvs()[0].clone();
    let lease = c.lease_grant(60, None).await.expect("grant").id();
    c.put("leased", "x", Some(PutOptions::new().with_lease(lease))).await.expect("put");
    let nested = Txn::new()
        .when([Compare::lease("leased", CompareOp::Equal, lease)])
        .and_then([TxnOp::put("txn/nested-success", "yes", None)])
        .or_else([TxnOp::put("txn/nested-failure", "yes", None)]);
    let txn = Txn::new()
        .when([
            Compare::value("fruit/apple", CompareOp::Equal, "green"),
            Compare::version("fruit/apple", CompareOp::Equal, 2),
            Compare::create_revision("fruit/apple", CompareOp::Equal, apple.create_revision()),
            Compare::mod_revision("fruit/apple", CompareOp::Equal, apple.mod_revision()),
            Compare::create_revision("fruit/none", CompareOp::Equal, 0),
        ])
        .and_then([
            TxnOp::put("fruit/apple", "ripe", None),
            TxnOp::txn(nested),
            TxnOp::get("fruit/apple", None),
        ])
        .or_else([TxnOp::put("txn/failed", "yes", None)]);
    let response = c.txn(txn.clone()).await.expect("txn");
    assert!(response.succeeded());
    let ops = response.op_responses();
    assert_eq!(ops.len(), 3);
    match &ops[1] {
        TxnOpResponse::Txn(inner) => assert!(inner.succeeded(), "the nested compare on the lease holds"),
        _ => panic!("nested txn response expected"),
    }
    match &ops[2] {
        TxnOpResponse::Get(get) => assert_eq!(get.kvs()[0].value(), b"ripe"),
        _ => panic!("get response expected"),
    }
    assert_eq!(c.get("txn/nested-success", None).await.expect("get").kvs()[0].value(), b"yes");
    assert!(c.get("txn/nested-failure", None).await.expect("get").kvs().is_empty());
    // The same Txn again: the value and revisions changed, the failure branch runs.
    let again = c.txn(txn).await.expect("txn");
    assert!(!again.succeeded());
    assert_eq!(c.get("txn/failed", None).await.expect("get").kvs()[0].value(), b"yes");

    // Compact, then reading a compacted revision fails with etcd's error.
    let head = c.put("fruit/apple", "eaten", None).await.expect("put").header().expect("header").revision();
    c.compact(head, None).await.expect("compact");
    let error =
        other.get("fruit/apple", Some(GetOptions::new().with_revision(first))).await.expect_err("compacted");
    expect_status(error, Code::OutOfRange, "etcdserver: mvcc: required revision has been compacted");
    let error =
        c.get("fruit/apple", Some(GetOptions::new().with_revision(head + 100))).await.expect_err("future");
    expect_status(error, Code::OutOfRange, "etcdserver: mvcc: required revision is a future revision");
    let error = c.compact(first, None).await.expect_err("compacted again");
    expect_status(error, Code::OutOfRange, "etcdserver: mvcc: required revision has been compacted");
}

/// A Txn nested 40 deep (etcd answers it in a millisecond) is answered, and clients of the
/// same member are served meanwhile: its check once took time exponential in the depth on
/// the runtime that drives Raft.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_txn_nested_forty_deep_is_answered_while_other_clients_are_served() {
    let cluster = TestCluster::start(3);
    cluster.leader().await;
    let mut deep_client = client(&cluster.members[0]).await;
    let mut other = client(&cluster.members[0]).await;
    let mut deep = Txn::new().and_then([TxnOp::put("deep/40", "v", None)]);
    for level in (0..40).rev() {
        deep = Txn::new()
            .when([Compare::version("deep/absent", CompareOp::Equal, 0)])
            .and_then([TxnOp::put(format!("deep/{level:02}"), "v", None), TxnOp::txn(deep)]);
    }
    let deadline = std::time::Duration::from_secs(10);
    let (answered, served) = tokio::join!(
        tokio::time::timeout(deadline, deep_client.txn(deep)),
        tokio::time::timeout(deadline, other.put("other/key", "served", None)),
    );
    served.expect("another client is served within the deadline").expect("put");
    let answered = answered.expect("the nested Txn is answered within the deadline").expect("txn");
    assert!(answered.succeeded());
    let written = other.get("deep/", Some(GetOptions::new().with_prefix())).await.expect("get");
    assert_eq!(written.kvs().len(), 41, "every level's put: {:?}", keys(&written));
    let revisions: std::collections::BTreeSet<i64> =
        written.kvs().iter().map(|kv| kv.mod_revision()).collect();
    assert_eq!(revisions.len(), 1, "one revision for the whole Txn: {revisions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prefix_history_prev_kv_cancel_and_progress() {
    let cluster = TestCluster::start(3);
    cluster.leader().await;
    let mut writer = client(&cluster.members[0]).await;
    let mut watcher = client(&cluster.members[1]).await;
    let start = writer.put("w/a", "1", None).await.expect("put").header().expect("header").revision();
    writer.put("w/b", "2", None).await.expect("put");
    writer.put("other", "x", None).await.expect("put");

    // From a past revision, with prev_kv: history first, then live events.
    let mut stream = watcher
        .watch("w/", Some(WatchOptions::new().with_prefix().with_start_revision(start).with_prev_key()))
        .await
        .expect("watch");
    let created = stream.message().await.expect("message").expect("created");
    assert!(created.created());
    let id = created.watch_id();
    writer.put("w/a", "3", None).await.expect("put");
    writer.delete("w/b", None).await.expect("delete");
    let mut events = Vec::new();
    while events.len() < 4 {
        let response = stream.message().await.expect("message").expect("events");
        for e in response.events() {
            let kv = e.kv().expect("kv");
            let prev = e.prev_kv().map(|p| String::from_utf8_lossy(p.value()).into_owned());
            events.push((
                e.event_type(),
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.mod_revision(),
                prev,
            ));
        }
    }
    assert_eq!(events.len(), 4, "{events:?}");
    assert_eq!((events[0].0, events[0].1.as_str(), events[0].2), (EventType::Put, "w/a", start));
    assert_eq!((events[1].0, events[1].1.as_str()), (EventType::Put, "w/b"));
    assert_eq!(
        (events[2].0, events[2].1.as_str(), events[2].3.as_deref()),
        (EventType::Put, "w/a", Some("1"))
    );
    assert_eq!(
        (events[3].0, events[3].1.as_str(), events[3].3.as_deref()),
        (EventType::Delete, "w/b", Some("2"))
    );
    assert!(events.windows(2).all(|p| p[0].2 < p[1].2));

    // Progress request: an empty response at the current revision.
    stream.request_progress().await.expect("progress");
    let head = writer.get("w/a", None).await.expect("get").header().expect("header").revision();
    let progress = stream.message().await.expect("message").expect("progress");
    assert!(progress.events().is_empty());
    assert!(progress.header().expect("header").revision() >= head);

    // Cancel: confirmed, and nothing more for that watcher.
    stream.cancel(id).await.expect("cancel");
    let canceled = stream.message().await.expect("message").expect("canceled");
    assert!(canceled.canceled());
    assert_eq!(canceled.watch_id(), id);

    // A watch from a compacted revision is cancelled with the compaction revision.
    let compacted_at = writer.put("w/c", "4", None).await.expect("put").header().expect("header").revision();
    writer.compact(compacted_at, None).await.expect("compact");
    // A watch is served from its member's own store, which applies the compaction a moment
    // after the leader answered it; until then a watch from `start` is as valid there as in
    // etcd. A linearizable read waits for the member to apply what was committed before it.
    let error = watcher
        .get("w/", Some(GetOptions::new().with_prefix().with_revision(start)))
        .await
        .expect_err("compacted on the watcher's member");
    expect_status(error, Code::OutOfRange, "etcdserver: mvcc: required revision has been compacted");
    let mut stream = watcher
        .watch("w/", Some(WatchOptions::new().with_prefix().with_start_revision(start)))
        .await
        .expect("watch");
    let response = tokio::time::timeout(DEADLINE, async {
        loop {
            let response = stream.message().await.expect("message").expect("a response");
            if response.canceled() {
                return response;
            }
        }
    })
    .await
    .expect("the compacted watch cancelled before the deadline");
    assert_eq!(response.compact_revision(), compacted_at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_grant_keep_alive_ttl_list_revoke_and_expire() {
    let cluster = TestCluster::start(3);
    cluster.leader().await;
    let mut c = client(&cluster.members[1]).await;
    let lease = c.lease_grant(30, None).await.expect("grant");
    assert_eq!(lease.ttl(), 30);
    let id = lease.id();
    c.put("session/a", "1", Some(PutOptions::new().with_lease(id))).await.expect("put");
    c.put("session/b", "2", Some(PutOptions::new().with_lease(id))).await.expect("put");

    let (mut keeper, mut responses) = c.lease_keep_alive(id).await.expect("keep-alive");
    for _ in 0..3 {
        keeper.keep_alive().await.expect("keep-alive sent");
        let response = responses.message().await.expect("keep-alive").expect("response");
        assert_eq!((response.id(), response.ttl()), (id, 30));
    }

    let ttl = c
        .lease_time_to_live(id, Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .expect("time to live");
    assert_eq!(ttl.granted_ttl(), 30);
    assert!(ttl.ttl() > 0 && ttl.ttl() <= 30);
    let mut attached: Vec<&[u8]> = ttl.keys().iter().map(Vec::as_slice).collect();
    attached.sort();
    assert_eq!(attached, [b"session/a".as_slice(), b"session/b"]);
    let leases = c.leases().await.expect("leases");
    assert!(leases.leases().iter().any(|l| l.id() == id));

    c.lease_revoke(id).await.expect("revoke");
    let left = c.get("session/", Some(GetOptions::new().with_prefix())).await.expect("get");
    assert!(left.kvs().is_empty(), "revoking deletes the lease's keys");
    assert_eq!(c.lease_time_to_live(id, None).await.expect("ttl of revoked").ttl(), -1);

    // Expiry: nobody keeps it alive, the leader expires it and its key goes.
    let short = c.lease_grant(2, None).await.expect("grant").id();
    c.put("session/short", "x", Some(PutOptions::new().with_lease(short))).await.expect("put");
    eventually("the short lease expired", || {
        let mut c = c.clone();
        async move { c.get("session/short", None).await.ok()?.kvs().is_empty().then_some(()) }
    })
    .await;
    assert!(!c.leases().await.expect("leases").leases().iter().any(|l| l.id() == short));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_and_maintenance() {
    let cluster = TestCluster::start(3);
    cluster.leader().await;
    let mut c = client(&cluster.members[0]).await;
    for i in 0..20 {
        c.put(format!("m/{i}"), format!("{i}"), None).await.expect("put");
    }

    let members = c.member_list().await.expect("member list");
    assert_eq!(members.members().len(), 3);
    let mut names: Vec<&str> = members.members().iter().map(|m| m.name()).collect();
    names.sort();
    assert_eq!(names, ["m0", "m1", "m2"]);

    // A learner nobody runs: added, not promotable while it has not caught up, removed.
    let unused = format!("http://127.0.0.1:{}", free_port());
    let added = c
        .member_add([unused.as_str()], Some(etcd_client::MemberAddOptions::new().with_is_learner()))
        .await
        .expect("add learner");
    let learner = added.member().expect("member").id();
    assert!(added.member().expect("member").is_learner());
    let error = c.member_promote(learner).await.expect_err("not caught up");
    expect_status(
        error,
        Code::FailedPrecondition,
        "etcdserver: can only promote a learner member which is in sync with leader",
    );
    c.member_remove(learner).await.expect("remove learner");
    assert_eq!(c.member_list().await.expect("member list").members().len(), 3);

    // Status of every member: one leader, Raft index and term, database size, version.
    let mut leaders = Vec::new();
    for m in &cluster.members {
        let status = client(m).await.status().await.expect("status");
        assert!(status.raft_index() > 20 && status.raft_term() >= 1, "{status:?}");
        assert!(status.db_size() > 0);
        assert!(!status.version().is_empty());
        leaders.push(status.leader());
    }
    assert!(leaders[0] != 0 && leaders.iter().all(|l| *l == leaders[0]));

    // HashKV at one revision agrees on every member once each has applied it.
    let revision = c.put("m/last", "x", None).await.expect("put").header().expect("header").revision();
    let mut hashes = Vec::new();
    for m in &cluster.members {
        let hash = eventually("the member's hash at the revision", || async {
            client(m).await.hash_kv(revision).await.ok()
        })
        .await;
        assert_eq!(hash.header().expect("header").revision(), revision);
        hashes.push(hash.hash());
    }
    assert!(hashes.iter().all(|h| *h == hashes[0]), "{hashes:?}");

    // Snapshot: a stream whose last message has nothing remaining, ending in the SHA-256
    // of everything before it.
    let mut stream = c.snapshot().await.expect("snapshot");
    let mut bytes = Vec::new();
    let mut last_remaining = None;
    while let Some(message) = stream.message().await.expect("snapshot message") {
        bytes.extend_from_slice(message.blob());
        last_remaining = Some(message.remaining_bytes());
    }
    assert_eq!(last_remaining, Some(0));
    assert!(bytes.len() > 32);
    let (body, checksum) = bytes.split_at(bytes.len() - 32);
    use sha2::Digest;
    assert_eq!(sha2::Sha256::digest(body).as_slice(), checksum);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_input_gets_etcds_codes_and_messages() {
    let cluster = TestCluster::start(3);
    cluster.leader().await;
    let mut c = client(&cluster.members[1]).await;

    let error = c.put("k", "v", Some(PutOptions::new().with_lease(0x1234))).await.expect_err("unknown lease");
    expect_status(error, Code::NotFound, "etcdserver: requested lease not found");
    let error = c.lease_revoke(0x1234).await.expect_err("unknown lease");
    expect_status(error, Code::NotFound, "etcdserver: requested lease not found");

    let large = vec![b'x'; 1536 * 1024 + 1];
    let error = c.put("big", large, None).await.expect_err("too large");
    expect_status(error, Code::InvalidArgument, "etcdserver: request is too large");
    assert!(c.get("big", None).await.expect("get").kvs().is_empty());

    let error = c.put("", "v", None).await.expect_err("empty key");
    expect_status(error, Code::InvalidArgument, "etcdserver: key is not provided");

    let twice = Txn::new().and_then([TxnOp::put("d", "1", None), TxnOp::put("d", "2", None)]);
    let error = c.txn(twice).await.expect_err("duplicate key");
    expect_status(error, Code::InvalidArgument, "etcdserver: duplicate key given in txn request");

    // etcd-client only sends known sort targets: an unknown one through the raw client.
    let mut raw = cluster.members[1].kv().await;
    let request = consensus_node::proto::etcdserverpb::RangeRequest {
        key: b"k".to_vec(),
        sort_target: 99,
        ..Default::default()
    };
    let error = raw.range(request).await.expect_err("invalid sort target");
    assert_eq!((error.code(), error.message()), (Code::InvalidArgument, "etcdserver: invalid sort option"));
}
