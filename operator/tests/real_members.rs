//! The operator's side of talking to members, against real `consensus-node` processes:
//! the shared observer reports members while they bootstrap, while they lead and after
//! quorum is lost, and (behind a TCP proxy that counts the connections made to it)
//! reconciles reuse one connection per member instead of opening new ones each time, and a
//! connection on which a member stopped answering is dropped, so the next reconcile
//! reaches the member again.

mod local_support;

use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use consensus_operator::membership::{EtcdMembers, MemberView, Members, Target, observe};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

fn free_port() -> u16 {
    StdListener::bind((Ipv4Addr::LOCALHOST, 0)).and_then(|l| l.local_addr()).expect("a free port").port()
}

/// One member of a cluster started by the test, killed (by its PID) when dropped.
struct Node {
    child: Child,
    client: SocketAddr,
}

impl Node {
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The ports of `size` members that bootstrap together, started one by one.
struct Cluster {
    dir: tempfile::TempDir,
    /// (client, peer, metrics) port of each member.
    ports: Vec<[u16; 3]>,
}

fn url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

impl Cluster {
    fn new(size: usize) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Self { dir, ports: (0..size).map(|_| [free_port(), free_port(), free_port()]).collect() }
    }

    fn name(i: usize) -> String {
        format!("m{i}")
    }

    fn target(&self, i: usize) -> Target {
        Target { name: Self::name(i), client_url: url(self.ports[i][0]) }
    }

    fn targets(&self) -> Vec<Target> {
        (0..self.ports.len()).map(|i| self.target(i)).collect()
    }

    fn start(&self, i: usize) -> Node {
        let [client, peer, metrics] = self.ports[i];
        let initial: Vec<String> =
            self.ports.iter().enumerate().map(|(j, p)| format!("{}={}", Self::name(j), url(p[1]))).collect();
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", Self::name(i)))).expect("log");
        let child = Command::new(local_support::node_binary())
            .arg("run")
            .args(["--name", &Self::name(i)])
            .arg("--data-dir")
            .arg(self.dir.path().join(Self::name(i)))
            .args(["--listen-client-urls", &url(client), "--advertise-client-urls", &url(client)])
            .args(["--listen-peer-urls", &url(peer), "--initial-advertise-peer-urls", &url(peer)])
            .args(["--listen-metrics-urls", &url(metrics)])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-token", "real-members"])
            .args(["--initial-cluster-state", "new"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting consensus-node");
        Node { child, client: (Ipv4Addr::LOCALHOST, client).into() }
    }
}

/// Observes `targets` until `check` accepts the view, as reconciles would.
async fn observe_until(
    members: &EtcdMembers,
    targets: &[Target],
    what: &str,
    check: impl Fn(&MemberView) -> bool,
) -> MemberView {
    let deadline = Instant::now() + local_support::DEADLINE;
    loop {
        let view = observe::combine(&members.ask(targets).await, |_| None);
        if check(&view) {
            return view;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {view:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn health(view: &MemberView) -> Vec<(String, bool)> {
    view.members.iter().flatten().map(|m| (m.name.clone(), m.healthy)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_reported_while_they_bootstrap_while_they_lead_and_when_quorum_is_lost() {
    let cluster = Cluster::new(3);
    let targets = cluster.targets();
    let members = EtcdMembers::default();

    // One of three founders runs: it answers, knows no leader, and is reported as it is.
    let mut running = vec![cluster.start(0)];
    let bootstrapping =
        observe_until(&members, &targets, "the first founder to answer", |v| v.members.is_some()).await;
    assert_eq!(bootstrapping.leader, None);
    assert_eq!(bootstrapping.leader_url, None, "nowhere to send a change");
    let reported = health(&bootstrapping);
    assert!(reported.contains(&("m0".to_owned(), false)), "{reported:?}");
    assert!(reported.iter().all(|(_, healthy)| !healthy), "{reported:?}");

    // All three: a leader, named with its own address, and everyone healthy.
    running.extend([cluster.start(1), cluster.start(2)]);
    let led =
        observe_until(&members, &targets, "a leader", |v| health(v).iter().filter(|(_, h)| *h).count() == 3)
            .await;
    let leader = led.leader.expect("a leader");
    let leading = led.members.iter().flatten().find(|m| m.id == leader).expect("the leader is listed");
    let at = targets.iter().position(|t| t.name == leading.name).expect("the leader is a target");
    assert_eq!(led.leader_url.as_deref(), Some(targets[at].client_url.as_str()));
    assert!(led.leader_raft_index.is_some() && led.cluster_id.is_some());

    // The leader and one follower gone: the other follower still answers and lists all
    // three, the two gone unhealthy, and no leader answers where a change could be sent.
    // (The survivor may go on naming the dead leader of its last term for a while: the
    // leader's own silence is what counts.)
    let survivor = (0..3).find(|&i| i != at).expect("a follower");
    for (i, node) in running.iter_mut().enumerate() {
        if i != survivor {
            node.stop();
        }
    }
    let gone = |v: &MemberView| {
        let reported = health(v);
        reported.len() == 3 && reported.iter().filter(|(_, healthy)| *healthy).count() <= 1
    };
    let lost = observe_until(&members, &targets, "the two stopped members to be unhealthy", gone).await;
    let names: Vec<String> = health(&lost).into_iter().map(|(name, _)| name).collect();
    assert_eq!(names.len(), 3, "every member listed by the survivor: {names:?}");
    assert!(health(&lost).iter().all(|(name, healthy)| !healthy || *name == targets[survivor].name));
    assert_eq!(lost.leader_url, None);
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
    let cluster = Cluster::new(1);
    let node = cluster.start(0);
    let proxy = Proxy::start(node.client).await;
    let target = Target { name: Cluster::name(0), client_url: proxy.url.clone() };
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
