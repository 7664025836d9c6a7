//! The operator's member connections, against a real `consensus-node` behind a TCP proxy
//! that counts the connections made to it: reconciles reuse one connection per member
//! instead of opening new ones each time, and a connection on which a member stopped
//! answering is dropped, so the next reconcile reaches the member again.

mod local_support;

use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use consensus_operator::membership::{EtcdMembers, Members, Target};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

fn free_port() -> u16 {
    StdListener::bind((Ipv4Addr::LOCALHOST, 0)).and_then(|l| l.local_addr()).expect("a free port").port()
}

/// A one-member cluster, killed (by its PID) when dropped.
struct Node {
    child: Child,
    client: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let [client, peer, metrics] = [free_port(), free_port(), free_port()];
        let url = |port: u16| format!("http://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("node.log")).expect("log");
        let child = Command::new(local_support::node_binary())
            .arg("run")
            .args(["--name", "solo"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &url(client), "--advertise-client-urls", &url(client)])
            .args(["--listen-peer-urls", &url(peer), "--initial-advertise-peer-urls", &url(peer)])
            .args(["--listen-metrics-urls", &url(metrics)])
            .args(["--initial-cluster", &format!("solo={}", url(peer))])
            .args(["--initial-cluster-token", "member-connections"])
            .args(["--initial-cluster-state", "new"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting consensus-node");
        Self { child, client: (Ipv4Addr::LOCALHOST, client).into(), _dir: dir }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Forwards to the node and counts the connections it accepts. Black-holed, it keeps
/// every connection open and passes nothing: a member that hangs, or an address that now
/// leads nowhere (a pod rescheduled to another IP).
struct Proxy {
    url: String,
    accepted: Arc<AtomicUsize>,
    black_hole: watch::Sender<bool>,
}

impl Proxy {
    async fn start(to: SocketAddr) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (black_hole, holes) = watch::channel(false);
        let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let (mut holes, held) = (holes.clone(), held.clone());
                tokio::spawn(async move {
                    let swallowed = if *holes.borrow() {
                        true
                    } else {
                        let Ok(mut outbound) = TcpStream::connect(to).await else { return };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => false,
                            _ = holes.wait_for(|hole| *hole) => true,
                        }
                    };
                    if swallowed {
                        held.lock().expect("lock").push(inbound);
                    }
                });
            }
        });
        Self { url, accepted, black_hole }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Asks until the member answers as its own leader (it elects itself within a second or so).
async fn until_leading(members: &EtcdMembers, target: &Target) {
    let deadline = Instant::now() + local_support::DEADLINE;
    loop {
        let answers = members.ask(std::slice::from_ref(target)).await;
        if answers.first().is_some_and(|a| a.leader != 0 && a.leader == a.member_id) {
            return;
        }
        assert!(Instant::now() < deadline, "the node never led: {answers:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciles_reuse_a_members_connection_and_drop_one_that_stopped_answering() {
    let node = Node::start();
    let proxy = Proxy::start(node.client).await;
    let target = Target { name: "solo".to_owned(), client_url: proxy.url.clone() };
    let members = EtcdMembers::default();
    until_leading(&members, &target).await;

    // Five more observations, as five reconciles make them: no new connection.
    let connections = proxy.accepted();
    for _ in 0..5 {
        let answers = members.ask(std::slice::from_ref(&target)).await;
        assert_eq!(answers.len(), 1, "the member answers every time");
        assert!(answers[0].members.is_some(), "and lists the membership");
    }
    assert_eq!(proxy.accepted(), connections, "each observation opened a new connection");

    // The connection goes dead without closing: that observation gets no answer ...
    proxy.black_hole.send_replace(true);
    assert!(members.ask(std::slice::from_ref(&target)).await.is_empty());
    // ... and the next one connects afresh instead of waiting on the dead connection again.
    proxy.black_hole.send_replace(false);
    let answers = members.ask(std::slice::from_ref(&target)).await;
    assert_eq!(answers.len(), 1, "the member is reached again on a new connection");
    assert!(proxy.accepted() > connections);
}
