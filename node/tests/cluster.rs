//! Three and one real members on loopback: election, replication, failover, catching up
//! from the log and through a snapshot, restarts.

mod support;

use consensus_node::proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use consensus_node::proto::etcdserverpb::request_op::Request;
use consensus_node::proto::etcdserverpb::response_op::Response;
use consensus_node::proto::etcdserverpb::{Compare, RangeRequest, RequestOp, TxnRequest};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_elect_a_leader_and_every_member_reads_an_acknowledged_write() {
    let cluster = TestCluster::start(3);
    let leader = cluster.leader().await;
    let follower = (leader + 1) % 3;
    // A write sent to a follower is forwarded to the leader.
    let revision = eventually("a write through a follower", || async {
        put(&cluster.members[follower], "greeting", "hello").await.ok()
    })
    .await;
    assert!(revision >= 2, "first write revision {revision}");
    for member in &cluster.members {
        let value = get(member, "greeting", false).await.expect("linearizable read");
        assert_eq!(value.as_deref(), Some(b"hello".as_slice()), "member {}", member.name);
    }
}

/// ReadIndex confirms the leadership with a heartbeat round: a read writes nothing to the log
/// (reads used to commit a blank entry each round, an fsync on a quorum per read), and neither
/// does a Txn that only reads (it went through the log as an entry of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_reads_and_read_only_txns_write_nothing_to_the_log() {
    let cluster = TestCluster::start(3);
    let leader = cluster.leader().await;
    eventually("a write", || async { put(&cluster.members[leader], "k", "v").await.ok() }).await;
    // Each member writes its client URLs into the membership once it serves.
    eventually("every member's client URLs in the membership", || async {
        let list = cluster.etcdctl(&cluster.endpoints(), &["member", "list", "-w", "json"]);
        let list: serde_json::Value = serde_json::from_slice(&list.stdout).ok()?;
        let members = list["members"].as_array()?;
        members.iter().all(|m| m["clientURLs"].as_array().is_some_and(|u| !u.is_empty())).then_some(())
    })
    .await;
    let raft_index = || async { cluster.members[leader].status().await.map(|s| s.raft_index) };
    let before = eventually("the leader's status", raft_index).await;
    let is_v = Compare {
        key: b"k".to_vec(),
        target: CompareTarget::Value as i32,
        result: CompareResult::Equal as i32,
        target_union: Some(TargetUnion::Value(b"v".to_vec())),
        range_end: Vec::new(),
    };
    let read_k = RequestOp {
        request: Some(Request::RequestRange(RangeRequest { key: b"k".to_vec(), ..Default::default() })),
    };
    let read_only = TxnRequest { compare: vec![is_v], success: vec![read_k], failure: Vec::new() };
    for member in &cluster.members {
        for _ in 0..10 {
            let value = get(member, "k", false).await.expect("linearizable read");
            assert_eq!(value.as_deref(), Some(b"v".as_slice()), "member {}", member.name);
            let answer = member.kv().await.txn(read_only.clone()).await.expect("read-only txn").into_inner();
            assert!(answer.succeeded, "member {}", member.name);
            let Some(Response::ResponseRange(range)) = &answer.responses[0].response else {
                panic!("a range")
            };
            assert_eq!(range.kvs[0].value, b"v");
        }
    }
    assert_eq!(eventually("the leader's status", raft_index).await, before);
}

/// A leader whose followers do not answer cannot confirm that it still leads: it refuses
/// linearizable reads (a partitioned leader may have been replaced), serves serializable ones
/// from what it has, and serves linearizable ones again once a quorum answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_followers_are_paused_refuses_linearizable_reads() {
    let cluster = TestCluster::start(3);
    let leader = cluster.leader().await;
    eventually("a write", || async { put(&cluster.members[leader], "k", "v").await.ok() }).await;
    let followers: Vec<&TestMember> = (0..3).filter(|&i| i != leader).map(|i| &cluster.members[i]).collect();
    for follower in &followers {
        follower.signal("STOP");
    }
    let refused = get(&cluster.members[leader], "k", false).await;
    let serializable = get(&cluster.members[leader], "k", true).await;
    for follower in &followers {
        follower.signal("CONT");
    }
    let refused = refused.expect_err("a linearizable read without a quorum");
    assert!(
        refused.message().contains("request timed out") || refused.message().contains("leader changed"),
        "{refused:?}"
    );
    assert_eq!(serializable.expect("serializable read").as_deref(), Some(b"v".as_slice()));
    let value = eventually("a linearizable read once the followers answer", || async {
        get(&cluster.members[cluster.leader().await], "k", false).await.ok()
    })
    .await;
    assert_eq!(value.as_deref(), Some(b"v".as_slice()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_elects_another_and_the_old_leader_catches_up_from_the_log() {
    let mut cluster = TestCluster::start(3);
    let first_leader = cluster.leader().await;
    eventually("first write", || async { put(&cluster.members[first_leader], "before", "1").await.ok() })
        .await;

    cluster.members[first_leader].kill9();
    let second_leader = cluster.leader().await;
    assert_ne!(second_leader, first_leader);
    eventually("a write after failover", || async {
        put(&cluster.members[second_leader], "after", "2").await.ok()
    })
    .await;

    cluster.members[first_leader].restart();
    let restarted = &cluster.members[first_leader];
    eventually("the restarted member to catch up", || async {
        (get(restarted, "after", true).await.ok()?.as_deref() == Some(b"2".as_slice())).then_some(())
    })
    .await;
    assert_eq!(get(restarted, "before", true).await.expect("read").as_deref(), Some(b"1".as_slice()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_missed_compacted_entries_catches_up_through_a_snapshot() {
    let mut cluster = TestCluster::start_with(
        3,
        Options { snapshot_count: 50, snapshot_catchup_entries: 10, ..Options::default() },
    );
    let leader = cluster.leader().await;
    let lagging = (leader + 1) % 3;
    cluster.members[lagging].kill9();
    for i in 0..300 {
        eventually("a write while a member is down", || async {
            put(&cluster.members[leader], &format!("bulk/{i:04}"), "x").await.ok()
        })
        .await;
    }
    cluster.members[lagging].restart();
    let member = &cluster.members[lagging];
    eventually("the lagging member to hold all 300 keys", || async {
        (keys_with_prefix(member, "bulk/").await.ok()?.len() == 300).then_some(())
    })
    .await;
    assert!(
        member.log_text().contains("installed a snapshot from the leader"),
        "caught up without a snapshot"
    );
    assert!(
        cluster.members[leader].log_text().contains("sending a copy of the store"),
        "the leader sent no copy of its store"
    );
    // A snapshot is the store itself: what each member keeps of it is a marker of the log id
    // the store is durable up to, never a copy of its 300 keys (sent copies are unlinked).
    for member in &cluster.members {
        let snap_dir = member.data_dir.join("member/snap");
        for entry in std::fs::read_dir(&snap_dir).expect("snapshot directory") {
            let entry = entry.expect("entry");
            let len = entry.metadata().expect("metadata").len();
            assert!(len < 1024, "{}: {len} bytes, a copy of the store", entry.path().display());
        }
    }
}

/// With no entry payload held in memory, the leader sends a member that was down the
/// entries it missed as read back from its WAL segments, and that member recovers its own
/// log the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_was_down_catches_up_from_entries_read_back_from_the_wal() {
    let mut cluster = TestCluster::start_with(3, Options { wal_held_bytes: 0, ..Options::default() });
    let leader = cluster.leader().await;
    let lagging = (leader + 1) % 3;
    eventually("a write before", || async { put(&cluster.members[leader], "before", "b").await.ok() }).await;
    cluster.members[lagging].kill9();
    for i in 0..200 {
        eventually("a write while a member is down", || async {
            put(&cluster.members[leader], &format!("bulk/{i:04}"), &format!("v{i}")).await.ok()
        })
        .await;
    }
    cluster.members[lagging].restart();
    let member = &cluster.members[lagging];
    eventually("the lagging member to hold all 200 keys", || async {
        (keys_with_prefix(member, "bulk/").await.ok()?.len() == 200).then_some(())
    })
    .await;
    for i in [0, 77, 199] {
        let value = get(member, &format!("bulk/{i:04}"), true).await.expect("serializable read");
        assert_eq!(value, Some(format!("v{i}").into_bytes()), "bulk/{i:04}");
    }
    assert_eq!(get(member, "before", true).await.expect("read"), Some(b"b".to_vec()));
    assert!(
        !member.log_text().contains("installed a snapshot from the leader"),
        "caught up through a snapshot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_member_cluster_serves_and_keeps_its_data_across_restarts() {
    let mut cluster = TestCluster::start(1);
    cluster.leader().await;
    eventually("a write", || async { put(&cluster.members[0], "solo", "v1").await.ok() }).await;
    cluster.members[0].kill9();
    cluster.members[0].restart();
    cluster.leader().await;
    let value =
        eventually("a read after restart", || async { get(&cluster.members[0], "solo", false).await.ok() })
            .await;
    assert_eq!(value.as_deref(), Some(b"v1".as_slice()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_the_leader_hands_leadership_over_before_exiting() {
    let mut cluster = TestCluster::start(3);
    let leader = cluster.leader().await;
    let status = cluster.members[leader].terminate();
    assert!(status.success(), "leader exited with {status}");
    assert!(cluster.members[leader].log_text().contains("handed leadership over"), "no handover logged");
    let next = cluster.leader().await;
    assert_ne!(next, leader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_a_follower_stops_it_while_the_leader_keeps_its_connection_open() {
    let mut cluster = TestCluster::start(3);
    let leader = cluster.leader().await;
    let follower = (leader + 1) % 3;
    // The leader's heartbeats keep a connection to the follower's peer port open.
    put(&cluster.members[leader], "k", "v").await.expect("put");
    let status = cluster.members[follower].terminate();
    assert!(status.success(), "follower exited with {status}");
    assert_eq!(cluster.leader().await, leader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_taken_when_the_log_grows_past_the_byte_threshold() {
    let cluster = TestCluster::start_with(
        1,
        Options { snapshot_count: 1_000_000, snapshot_bytes: 32 * 1024, ..Options::default() },
    );
    cluster.leader().await;
    let value = "v".repeat(1024);
    for i in 0..64 {
        eventually("a write", || async { put(&cluster.members[0], &format!("big/{i}"), &value).await.ok() })
            .await;
    }
    let snap_dir = cluster.members[0].data_dir.join("member/snap");
    eventually("a snapshot file after 64 KiB of writes", || async {
        std::fs::read_dir(&snap_dir)
            .ok()?
            .filter_map(|e| e.ok())
            .any(|e| e.path().extension().is_some_and(|x| x == "snap"))
            .then_some(())
    })
    .await;
    assert!(cluster.members[0].log_text().contains("WAL grew past --snapshot-bytes"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_of_another_cluster_refuses_its_raft_messages() {
    let a = TestCluster::start(1);
    let b = TestCluster::start(1);
    a.leader().await;
    b.leader().await;
    eventually("a write to A", || async { put(&a.members[0], "owner", "A").await.ok() }).await;
    eventually("a write to B", || async { put(&b.members[0], "owner", "B").await.ok() }).await;
    // B is told, wrongly, that A's member is a new learner of B.
    let added = b.etcdctl(
        &b.endpoints(),
        &["member", "add", "intruder", "--learner", &format!("--peer-urls={}", a.members[0].peer_url())],
    );
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    eventually("B's leader to be refused for the cluster id", || async {
        b.members[0].log_text().contains("this member belongs to cluster").then_some(())
    })
    .await;
    // A's data is A's, and A still serves it.
    assert_eq!(get(&a.members[0], "owner", false).await.expect("read").as_deref(), Some(b"A".as_slice()));
}

/// A leader killed and started again at once leads again only after an election, in a new
/// term. openraft's default let it take its old term's leadership back at start: with its
/// log missing entries a quorum of followers had committed (a leader sends before its own
/// fsync), it wrote other entries under the same log ids and the members diverged (found by
/// the chaos harness: `make chaos SEED=13 CLASSES=fsync`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_and_started_again_at_once_leads_only_after_an_election() {
    let mut cluster = TestCluster::start(3);
    let leader = cluster.leader().await;
    eventually("a write", || async { put(&cluster.members[leader], "k", "v").await.ok() }).await;
    let term = cluster.members[leader].status().await.expect("status").raft_term;
    cluster.members[leader].kill9();
    cluster.members[leader].restart();
    let now = cluster.leader().await;
    let status = cluster.members[now].status().await.expect("status");
    assert!(
        status.raft_term > term,
        "leader {now} in term {} after the leader of term {term} restarted",
        status.raft_term
    );
    assert_eq!(
        get(&cluster.members[leader], "k", false).await.expect("read").as_deref(),
        Some(b"v".as_slice())
    );
}

/// A one-member cluster whose member was started with `failpoint=exit` and ended there.
fn crashed_at(token: &str, failpoint: &str) -> TestCluster {
    use consensus_node::failpoint::{FAILPOINT_EXIT, FAILPOINTS_ENV};
    let mut cluster = TestCluster::prepare_with_token(1, token);
    cluster.members[0].env = vec![(FAILPOINTS_ENV.to_owned(), format!("{failpoint}=exit"))];
    cluster.start_member(0);
    assert_eq!(cluster.members[0].wait_exit().code(), Some(FAILPOINT_EXIT), "stopped at {failpoint}");
    cluster
}

/// A founder that crashed after saving its identity and before Raft held its first membership
/// bootstraps when started again; it used to take the saved identity for a member that had
/// run, and waited forever for a leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_founder_that_crashed_before_raft_was_initialized_bootstraps_when_started_again() {
    let mut cluster = crashed_at("crash-at-bootstrap", "identity-saved");
    assert!(cluster.members[0].data_dir.join("member/identity.json").exists(), "the identity was saved");

    cluster.members[0].env.clear();
    cluster.members[0].restart();
    cluster.leader().await;
    eventually("a write to the bootstrapped member", || async {
        put(&cluster.members[0], "k", "v").await.ok()
    })
    .await;
    // Started again, the member finds Raft's state and no longer carries the founding list.
    cluster.members[0].terminate();
    cluster.members[0].restart();
    cluster.leader().await;
    // JSON, then a 4-byte checksum.
    let identity = std::fs::read(cluster.members[0].data_dir.join("member/identity.json")).expect("identity");
    let identity = String::from_utf8_lossy(&identity);
    assert!(!identity.contains("founding"), "{identity}");
    assert_eq!(get(&cluster.members[0], "k", false).await.expect("read").as_deref(), Some(b"v".as_slice()));
}

/// A member killed while it makes its store, on its very first start, starts again: the
/// store is made under another name and renamed into place once complete. Made in place, a
/// kill left a half-written store redb never opened again (the chaos harness found one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_killed_while_making_its_store_starts_again() {
    let mut cluster = crashed_at("crash-making-store", "store-created");
    let member = cluster.members[0].data_dir.join("member");
    assert!(!member.join("kv.redb").exists(), "no store in place before it is complete");
    // What a kill in the middle of writing it leaves.
    let creating = member.join("kv.redb.creating");
    let made = std::fs::read(&creating).expect("the store being made");
    std::fs::write(&creating, &made[..made.len().min(100)]).expect("cut short");

    cluster.members[0].env.clear();
    cluster.members[0].restart();
    cluster.leader().await;
    eventually("a write to the member", || async { put(&cluster.members[0], "k", "v").await.ok() }).await;
    assert!(!creating.exists(), "the half-made store is gone");
}

/// Every peer request carries the sender's cluster id: a forwarded write, a membership change
/// or a Raft message without one is refused and changes nothing. Only the roster question a
/// joiner asks before it knows its cluster is answered without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_request_without_a_cluster_id_is_refused_and_changes_nothing() {
    use consensus_node::member::{ForwardRequest, ForwardResponse};
    use consensus_node::proto::etcdserverpb::PutRequest;
    use consensus_node::proto::raft::RaftMessage;
    use consensus_node::proto::raft::raft_peer_client::RaftPeerClient;
    use consensus_node::raft::network::{decode, encode};
    use consensus_node::raft::types::Command;
    use prost::Message;

    let cluster = TestCluster::start(1);
    cluster.leader().await;
    let channel = tonic::transport::Endpoint::from_shared(cluster.members[0].peer_url())
        .expect("peer url")
        .connect()
        .await
        .expect("peer port");
    let mut peer = RaftPeerClient::new(channel);
    let message = |request: &ForwardRequest| RaftMessage { payload: encode(request).expect("encode") };

    let put = PutRequest { key: b"intruded".to_vec(), value: b"yes".to_vec(), ..Default::default() };
    let untagged = [
        ForwardRequest::Write(Command::Put(put.encode_to_vec())),
        ForwardRequest::AddMember { peer_urls: vec!["http://127.0.0.1:1".to_owned()], learner: true },
    ];
    for request in &untagged {
        let refused = peer.forward(message(request)).await.expect_err("refused without a cluster id");
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
        assert!(refused.message().contains("without a cluster id"), "{refused}");
    }
    let append = peer.append_entries(RaftMessage { payload: Vec::new() }).await.expect_err("refused");
    assert_eq!(append.code(), tonic::Code::FailedPrecondition, "{append}");

    let roster = peer.forward(message(&ForwardRequest::Roster)).await.expect("the roster is answered");
    let answer: Result<ForwardResponse, consensus_node::api::errors::ServerError> =
        decode(&roster.into_inner().payload).expect("decode");
    match answer.expect("roster") {
        ForwardResponse::Roster { members, .. } => assert_eq!(members.len(), 1, "nothing was added"),
        other => panic!("unexpected answer {other:?}"),
    }
    assert_eq!(get(&cluster.members[0], "intruded", false).await.expect("read"), None, "nothing was written");
}

/// Under a container runtime, `kubectl logs` or a pipe, stderr is no terminal: the log lines
/// must be plain text. tracing's formatter writes colour codes unless it is told otherwise,
/// and with them every field reads `ESC[3mname ESC[0m ESC[2m= ESC[0m` in a log file.
#[test]
fn a_member_logging_to_a_pipe_writes_no_colour_codes() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    /// Kills the member by PID when the test ends, also when it fails.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    let dir = tempfile::tempdir().expect("temporary directory");
    let url = |port: u16| format!("http://127.0.0.1:{port}");
    let (client, peer, metrics) = (url(free_port()), url(free_port()), url(free_port()));
    let data_dir = dir.path().join("data");
    let mut member = Killed(
        Command::new(env!("CARGO_BIN_EXE_consensus-node"))
            .args(["run", "--name", "piped", "--data-dir"])
            .arg(&data_dir)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--listen-metrics-urls", &metrics])
            .env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("consensus-node starts"),
    );
    // Lines arrive on a thread so the wait below has a deadline even if the member hangs.
    let stderr = member.0.stderr.take().expect("stderr is piped");
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    let starting = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match received.recv_timeout(left) {
            Ok(line) if line.contains("starting member") => break line,
            Ok(line) => seen.push(line),
            Err(_) => panic!("no \"starting member\" line before the deadline or the exit; got {seen:?}"),
        }
    };
    seen.push(starting.clone());
    for line in &seen {
        assert!(!line.contains('\u{1b}'), "a colour code in a log line written to a pipe: {line:?}");
    }
    // The fields as text, which is what colour codes would have split.
    assert!(starting.contains("INFO") && starting.contains("name=piped"), "{starting:?}");
}

/// mimalloc would ask for transparent huge pages, and every fault would clear 2 MiB: the
/// member turns them off for itself (`main.rs`, `disable_transparent_huge_pages`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_runs_without_transparent_huge_pages() {
    let cluster = TestCluster::start(1);
    cluster.leader().await;
    let pid = cluster.members[0].pid().expect("running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the member's status");
    let thp = status.lines().find_map(|line| line.strip_prefix("THP_enabled:")).map(str::trim);
    assert_eq!(thp, Some("0"), "{status}");
}
