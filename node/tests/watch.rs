//! The Watch service against 3-member clusters: Debian's etcdctl (3.4) and a gRPC client of
//! our own where the test needs revisions and watch ids.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use consensus_node::proto::etcdserverpb::watch_client::WatchClient;
use consensus_node::proto::etcdserverpb::watch_request::RequestUnion;
use consensus_node::proto::etcdserverpb::{
    WatchCancelRequest, WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse,
};
use support::*;
use tokio::sync::mpsc;
use tonic::Streaming;

/// A running `etcdctl watch`, its output lines collected as they come; killed when dropped.
struct EtcdctlWatch {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl EtcdctlWatch {
    fn start(endpoint: &str, args: &[&str]) -> Self {
        let mut child = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoint}"))
            .arg("watch")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("etcdctl is installed (Debian package etcd-client)");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            child.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child.stderr.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    lines.lock().expect("lines").push(line);
                }
            });
        }
        Self { child, lines }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    /// Waits until the output is exactly `expected` (so nothing extra arrived with it).
    async fn expect_lines(&self, expected: &[&str]) {
        eventually(&format!("etcdctl watch to print {expected:?}"), || async {
            let lines = self.lines();
            (lines.len() >= expected.len()).then_some(())
        })
        .await;
        assert_eq!(self.lines(), expected);
    }
}

impl Drop for EtcdctlWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `done` for a short while (the caller retries around it).
async fn eventually_quick(mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// etcdctl prints nothing when its watch is created, so the test waits for the stream to
/// be open on the member by watching a marker key first.
async fn wait_for_watch(cluster: &TestCluster, watch: &EtcdctlWatch, marker: &str) {
    let mut attempt = 0;
    eventually("the etcdctl watch to be established", || {
        attempt += 1;
        let value = attempt.to_string();
        async move {
            ok(cluster.etcdctl(&cluster.endpoints(), &["put", marker, &value]));
            // Events arrive in order: once this put's value is printed, nothing is pending.
            eventually_quick(|| watch.lines().last() == Some(&value)).await.then_some(())
        }
    })
    .await;
    watch.lines.lock().expect("lines").clear();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_watch_prefix_sees_puts_and_deletes_made_elsewhere() {
    let cluster = TestCluster::start(3);
    let leader = cluster.leader().await;
    // Watch on a follower, write through the leader.
    let follower = &cluster.members[(leader + 1) % 3];
    let watch = EtcdctlWatch::start(&follower.endpoint(), &["--prefix", "/app/"]);
    wait_for_watch(&cluster, &watch, "/app/marker").await;
    let writer = cluster.members[leader].endpoint();
    ok(cluster.etcdctl(&writer, &["put", "/app/a", "1"]));
    ok(cluster.etcdctl(&writer, &["put", "/other", "x"]));
    ok(cluster.etcdctl(&writer, &["put", "/app/a", "2"]));
    ok(cluster.etcdctl(&writer, &["put", "/app/b", "3"]));
    ok(cluster.etcdctl(&writer, &["del", "/app/", "--prefix"]));
    watch
        .expect_lines(&[
            "PUT",
            "/app/a",
            "1",
            "PUT",
            "/app/a",
            "2",
            "PUT",
            "/app/b",
            "3",
            "DELETE",
            "/app/a",
            "",
            "DELETE",
            "/app/b",
            "",
            "DELETE",
            "/app/marker",
            "",
        ])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_watch_rev_replays_history_with_previous_values() {
    let cluster = TestCluster::start(3);
    cluster.leader().await;
    let endpoints = cluster.endpoints();
    let first = put(&cluster.members[cluster.leader().await], "k", "v1").await.expect("put");
    ok(cluster.etcdctl(&endpoints, &["put", "k", "v2"]));
    ok(cluster.etcdctl(&endpoints, &["put", "other", "x"]));
    ok(cluster.etcdctl(&endpoints, &["del", "k"]));

    // From the second write on, each event with the key's previous state before it.
    let member = &cluster.members[0];
    let replay =
        EtcdctlWatch::start(&member.endpoint(), &["k", &format!("--rev={}", first + 1), "--prev-kv"]);
    replay.expect_lines(&["PUT", "k", "v1", "k", "v2", "DELETE", "k", "v2", "k", ""]).await;
    // Then the live feed, with no gap and nothing twice.
    ok(cluster.etcdctl(&endpoints, &["put", "k", "v3"]));
    replay.expect_lines(&["PUT", "k", "v1", "k", "v2", "DELETE", "k", "v2", "k", "", "PUT", "k", "v3"]).await;

    // The whole history, without previous values.
    let all = EtcdctlWatch::start(&member.endpoint(), &["k", &format!("--rev={first}")]);
    all.expect_lines(&["PUT", "k", "v1", "PUT", "k", "v2", "DELETE", "k", "", "PUT", "k", "v3"]).await;
}

fn watch_channel(member: &TestMember) -> WatchClient<tonic::transport::Channel> {
    // No request timeout: a watch stream lives as long as the test needs it.
    let channel = tonic::transport::Endpoint::from_shared(member.client_url())
        .expect("valid url")
        .connect_timeout(Duration::from_secs(1))
        .connect_lazy();
    WatchClient::new(channel)
}

struct GrpcWatch {
    requests: mpsc::Sender<WatchRequest>,
    responses: Streaming<WatchResponse>,
}

impl GrpcWatch {
    async fn open(member: &TestMember) -> Self {
        let (requests, rx) = mpsc::channel(16);
        let responses = watch_channel(member)
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("watch stream opens")
            .into_inner();
        Self { requests, responses }
    }

    async fn send(&self, request: RequestUnion) {
        self.requests.send(WatchRequest { request_union: Some(request) }).await.expect("request sent");
    }

    async fn create(&self, create: WatchCreateRequest) {
        self.send(RequestUnion::CreateRequest(create)).await;
    }

    async fn next(&mut self) -> WatchResponse {
        tokio::time::timeout(DEADLINE, self.responses.message())
            .await
            .expect("a watch response before the deadline")
            .expect("the stream is healthy")
            .expect("the stream is open")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_ids_progress_and_cancel_follow_etcd() {
    let cluster = TestCluster::start(3);
    let leader = cluster.leader().await;
    let member = &cluster.members[(leader + 1) % 3];
    let mut watch = GrpcWatch::open(member).await;

    watch.create(WatchCreateRequest { key: b"a".to_vec(), watch_id: 7, ..Default::default() }).await;
    let created = watch.next().await;
    assert!(created.created && !created.canceled && created.watch_id == 7, "{created:?}");
    assert!(created.header.as_ref().is_some_and(|h| h.revision >= 1 && h.member_id != 0), "{created:?}");

    watch.create(WatchCreateRequest { key: b"a".to_vec(), watch_id: 7, ..Default::default() }).await;
    let duplicate = watch.next().await;
    assert!(duplicate.created && duplicate.canceled && duplicate.watch_id == -1, "{duplicate:?}");
    assert!(duplicate.cancel_reason.contains("duplicate watch ID"), "{duplicate:?}");

    // Ids the server picks start at 0.
    watch.create(WatchCreateRequest { key: b"b".to_vec(), ..Default::default() }).await;
    assert_eq!(watch.next().await.watch_id, 0);
    watch
        .create(WatchCreateRequest { key: b"c".to_vec(), range_end: b"a".to_vec(), ..Default::default() })
        .await;
    assert!(watch.next().await.cancel_reason.contains("watcher range is empty"));

    let written = put(&cluster.members[leader], "a", "1").await.expect("put");
    let event = watch.next().await;
    assert_eq!((event.watch_id, event.events.len()), (7, 1), "{event:?}");
    assert_eq!(event.header.as_ref().map(|h| h.revision), Some(written), "{event:?}");

    // A progress answer covers every watcher of the stream, at a revision they all have.
    let written = put(&cluster.members[leader], "elsewhere", "x").await.expect("put");
    eventually("the member to apply the write", || async {
        (get(member, "elsewhere", true).await.ok()?.is_some()).then_some(())
    })
    .await;
    watch.send(RequestUnion::ProgressRequest(WatchProgressRequest {})).await;
    let progress = watch.next().await;
    assert_eq!(progress.watch_id, -1, "{progress:?}");
    assert!(progress.events.is_empty() && !progress.created && !progress.canceled);
    assert!(progress.header.as_ref().is_some_and(|h| h.revision >= written), "{progress:?}");

    watch.send(RequestUnion::CancelRequest(WatchCancelRequest { watch_id: 7 })).await;
    let canceled = watch.next().await;
    assert!(canceled.canceled && canceled.watch_id == 7, "{canceled:?}");
    // Nothing more for the cancelled watcher; the other still hears its key.
    put(&cluster.members[leader], "a", "2").await.expect("put");
    put(&cluster.members[leader], "b", "1").await.expect("put");
    let event = watch.next().await;
    assert_eq!(event.watch_id, 0, "{event:?}");
    assert_eq!(event.events[0].kv.as_ref().map(|kv| kv.key.clone()), Some(b"b".to_vec()));
}

/// Puts `key` through whichever running member accepts it.
async fn put_anywhere(cluster: &TestCluster, key: &str, value: &str) -> i64 {
    eventually(&format!("put {key}"), || async {
        for member in cluster.members.iter().filter(|m| m.is_running()) {
            if let Ok(revision) = put(member, key, value).await {
                return Some(revision);
            }
        }
        None
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_a_follower_sees_every_revision_across_a_leader_change() {
    let mut cluster = TestCluster::start(3);
    let leader = cluster.leader().await;
    let watched = (leader + 1) % 3;
    let mut watch = GrpcWatch::open(&cluster.members[watched]).await;
    watch
        .create(WatchCreateRequest { key: b"/x/".to_vec(), range_end: b"/x0".to_vec(), ..Default::default() })
        .await;
    let created = watch.next().await;
    assert!(created.created);
    let start = created.header.map_or(0, |h| h.revision);

    let total = 60;
    for i in 0..total {
        if i == total / 3 {
            cluster.members[leader].kill9();
        }
        put_anywhere(&cluster, &format!("/x/{i:03}"), &i.to_string()).await;
    }
    // Every write is to the watched range, so the watcher must see every revision after
    // `start` exactly once, in order. A put retried after an unknown outcome may appear
    // twice, at two revisions; every key must appear.
    let mut revisions = Vec::new();
    let mut keys = std::collections::BTreeSet::new();
    while keys.len() < total {
        let response = watch.next().await;
        assert!(!response.canceled, "{response:?}");
        for event in response.events {
            let kv = event.kv.expect("kv");
            revisions.push(kv.mod_revision);
            keys.insert(kv.key);
        }
    }
    let expected: Vec<i64> = (start + 1..start + 1 + revisions.len() as i64).collect();
    assert_eq!(revisions, expected);
    assert_ne!(cluster.leader().await, leader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_watch_from_a_compacted_revision_is_refused() {
    let cluster = TestCluster::start(3);
    cluster.leader().await;
    let endpoints = cluster.endpoints();
    let first = put(&cluster.members[cluster.leader().await], "k", "v1").await.expect("put");
    ok(cluster.etcdctl(&endpoints, &["put", "k", "v2"]));
    let last = put(&cluster.members[cluster.leader().await], "k", "v3").await.expect("put");
    ok(cluster.etcdctl(&endpoints, &["compact", &last.to_string()]));
    let watch = EtcdctlWatch::start(&cluster.members[0].endpoint(), &["k", &format!("--rev={first}")]);
    eventually("etcdctl to report the compaction", || async {
        watch.lines().iter().any(|l| l.contains("required revision has been compacted")).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_still_gets_every_revision_once() {
    let cluster = TestCluster::start(3);
    let leader = cluster.leader().await;
    let mut watch = GrpcWatch::open(&cluster.members[(leader + 1) % 3]).await;
    watch
        .create(WatchCreateRequest {
            key: b"big/".to_vec(),
            range_end: b"big0".to_vec(),
            ..Default::default()
        })
        .await;
    let start = watch.next().await.header.map_or(0, |h| h.revision);
    // Far more than the member buffers for one stream (responses queued, HTTP/2 windows,
    // batches the hub keeps), written while the client reads nothing: the stream falls
    // behind the feed and must re-read the rest from history.
    let value = "v".repeat(32 << 10);
    let total = 400;
    for i in 0..total {
        put_anywhere(&cluster, &format!("big/{i:04}"), &value).await;
    }
    let mut revisions = Vec::new();
    while revisions.len() < total {
        let response = watch.next().await;
        assert!(!response.canceled, "{response:?}");
        revisions.extend(response.events.iter().map(|e| e.kv.as_ref().map_or(0, |kv| kv.mod_revision)));
    }
    let expected: Vec<i64> = (start + 1..=start + total as i64).collect();
    assert_eq!(revisions, expected);
    // The test is about that path: make sure it was taken.
    let log = cluster.members[(leader + 1) % 3].log_text();
    assert!(log.contains("fell behind"), "the stream never fell behind the feed");
}
