//! Nothing acknowledged is lost: kill -9 members while clients write, then check every
//! acknowledged write on every member; and a damaged log stops a member with a clear error.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;

/// A small deterministic generator, so a failing run can be replayed from its seed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self, bound: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % bound as u64) as usize
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_write_is_lost_when_members_are_killed() {
    let seed = std::env::var("CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_cafe_u64);
    println!("CHAOS_SEED={seed}");
    let mut rng = XorShift(seed);
    let mut cluster = TestCluster::start_with(
        3,
        Options { snapshot_count: 200, snapshot_catchup_entries: 50, ..Options::default() },
    );
    let endpoints: Vec<String> = cluster.members.iter().map(|m| m.client_url()).collect();
    cluster.leader().await;

    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let acks = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for writer in 0..3 {
        let (endpoints, acknowledged, acks, stop) =
            (endpoints.clone(), acknowledged.clone(), acks.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let key = format!("chaos/{writer}/{n:05}");
                let endpoint = &endpoints[(writer + n) % endpoints.len()];
                let mut client = consensus_node::proto::etcdserverpb::kv_client::KvClient::new(
                    tonic::transport::Endpoint::from_shared(endpoint.clone())
                        .expect("url")
                        .connect_timeout(Duration::from_millis(500))
                        .timeout(Duration::from_secs(3))
                        .connect_lazy(),
                );
                let request = consensus_node::proto::etcdserverpb::PutRequest {
                    key: key.clone().into_bytes(),
                    value: key.clone().into_bytes(),
                    ..Default::default()
                };
                if client.put(request).await.is_ok() {
                    acknowledged.lock().expect("acks").push(key);
                    acks.fetch_add(1, Ordering::SeqCst);
                }
                n += 1;
            }
        }));
    }

    let wait_for_acks = |target: usize| {
        let acks = acks.clone();
        async move {
            eventually("writes to keep being acknowledged", || async {
                (acks.load(Ordering::SeqCst) >= target).then_some(())
            })
            .await
        }
    };
    for _round in 0..6 {
        let victim = rng.next(3);
        wait_for_acks(acks.load(Ordering::SeqCst) + 40 + rng.next(60)).await;
        cluster.members[victim].kill9();
        // The survivors keep a quorum, so writes go on while the victim is down.
        wait_for_acks(acks.load(Ordering::SeqCst) + 40 + rng.next(60)).await;
        cluster.members[victim].restart();
    }
    stop.store(true, Ordering::SeqCst);
    for writer in writers {
        writer.await.expect("writer task");
    }

    let acknowledged = acknowledged.lock().expect("acks").clone();
    assert!(acknowledged.len() >= 480, "only {} writes acknowledged", acknowledged.len());
    cluster.leader().await;
    for member in &cluster.members {
        let present = eventually("every member to converge", || async {
            let keys = keys_with_prefix(member, "chaos/").await.ok()?;
            acknowledged.iter().all(|k| keys.binary_search(k).is_ok()).then_some(keys)
        })
        .await;
        assert!(present.len() >= acknowledged.len());
    }
    println!(
        "{} acknowledged writes, all present on all 3 members after 6 kill -9 rounds",
        acknowledged.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_with_a_damaged_log_refuses_to_start_and_says_where() {
    let mut cluster = TestCluster::start(1);
    cluster.leader().await;
    for i in 0..30 {
        eventually("a write", || async { put(&cluster.members[0], &format!("k{i}"), "v").await.ok() }).await;
    }
    let status = cluster.members[0].terminate();
    assert!(status.success());
    let wal_dir = cluster.members[0].data_dir.join("member/raft/wal");
    let segment = std::fs::read_dir(&wal_dir)
        .expect("wal dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .max()
        .expect("a segment");
    let mut bytes = std::fs::read(&segment).expect("read segment");
    // A bit in the middle of the log, well before its last record.
    let middle = bytes.len() / 3;
    bytes[middle] ^= 0x01;
    std::fs::write(&segment, &bytes).expect("write segment");

    cluster.members[0].restart();
    let log = eventually("the member to exit", || async {
        let text = cluster.members[0].log_text();
        text.contains("corrupt at offset").then_some(text)
    })
    .await;
    assert!(log.contains(&segment.display().to_string()), "error names the file: {log}");
    // The damaged file is left as it was for inspection.
    assert_eq!(std::fs::read(&segment).expect("read segment"), bytes);
}

/// A member whose disk fails an fdatasync stops (Raft cannot go on after a storage error)
/// and exits, as etcd does, so whoever runs it starts it again; the write that met the
/// failure is never acknowledged, and started on a good disk the member serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_fsync_fails_exits_and_acknowledges_nothing_it_did_not_persist() {
    use consensus_node::failpoint::FAILPOINTS_ENV;
    let mut cluster = TestCluster::start(1);
    cluster.leader().await;
    eventually("a first write", || async { put(&cluster.members[0], "before", "1").await.ok() }).await;
    cluster.members[0].terminate();
    cluster.members[0].env = vec![(FAILPOINTS_ENV.to_owned(), "wal-fsync=error".to_owned())];
    cluster.members[0].restart();
    // Starting, the member elects itself, which writes to its log: the fsync fails there.
    let status = cluster.members[0].wait_exit();
    assert!(!status.success(), "{status:?}");
    assert!(cluster.members[0].log_text().contains("Raft stopped"), "{}", cluster.members[0].log_text());

    cluster.members[0].env.clear();
    cluster.members[0].restart();
    cluster.leader().await;
    assert_eq!(
        get(&cluster.members[0], "before", false).await.expect("read").as_deref(),
        Some(b"1".as_slice())
    );
    eventually("a write on a good disk", || async { put(&cluster.members[0], "after", "2").await.ok() })
        .await;
}

/// A large DeleteRange commits its tombstones in durable steps of 4,096, the store's
/// revision unchanged until its last. A member killed between two steps applies the request
/// again, whole, when it starts: afterwards its store is the same as the other members',
/// the lease's keys included (the Maintenance Hash covers every table), and no key is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_killed_between_the_steps_of_a_large_delete_applies_it_again_whole() {
    use consensus_node::failpoint::{FAILPOINT_EXIT, FAILPOINTS_ENV};
    use etcd_client::{Client, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp};
    let mut cluster = TestCluster::start(3);
    let leader = cluster.leader().await;
    let victim = (leader + 1) % 3;
    cluster.members[victim].terminate();
    cluster.members[victim].env = vec![(FAILPOINTS_ENV.to_owned(), "delete-step-committed=exit".to_owned())];
    cluster.members[victim].restart();
    cluster.leader().await;

    let endpoint = cluster.members[leader].endpoint();
    let mut client = Client::connect([endpoint], None).await.expect("etcd-client connects");
    let lease = client.lease_grant(3600, None).await.expect("grant").id();
    // Two steps and a part: Txns of 128 puts, etcd's limit per Txn.
    let (txns, per_txn) = (65, 128);
    for t in 0..txns {
        let puts = (0..per_txn)
            .map(|i| {
                TxnOp::put(format!("/big/{t:03}/{i:03}"), "v", Some(PutOptions::new().with_lease(lease)))
            })
            .collect::<Vec<_>>();
        client.txn(Txn::new().and_then(puts)).await.expect("txn of puts");
    }
    let deleted = client.delete("/big/", Some(DeleteOptions::new().with_prefix())).await.expect("delete");
    assert_eq!(deleted.deleted(), txns * per_txn);
    let revision = deleted.header().expect("header").revision();
    assert_eq!(
        cluster.members[victim].wait_exit().code(),
        Some(FAILPOINT_EXIT),
        "the member stopped after a step of the delete"
    );

    cluster.members[victim].env.clear();
    cluster.members[victim].restart();
    let restarted =
        Client::connect([cluster.members[victim].endpoint()], None).await.expect("etcd-client connects");
    let expected = client.hash_kv(revision).await.expect("HashKV").hash();
    eventually("the restarted member's HashKV at the delete's revision", || async {
        let at = restarted.clone().hash_kv(revision).await.ok()?;
        (at.hash() == expected).then_some(())
    })
    .await;
    let left = restarted.clone().get("/big/", Some(GetOptions::new().with_prefix().with_count_only())).await;
    assert_eq!(left.expect("count").count(), 0, "no key left on the restarted member");
    eventually("the same store on every member", || async {
        let mut hashes = Vec::new();
        for m in &cluster.members {
            let mut c = Client::connect([m.endpoint()], None).await.ok()?;
            hashes.push(c.hash().await.ok()?.hash());
        }
        hashes.windows(2).all(|w| w[0] == w[1]).then_some(())
    })
    .await;
}
