//! Debian's etcdctl 3.4 `lock` and `elect` against a 3-member cluster. These are etcd's
//! client-side recipes over Txn, Watch and Lease (not our Lock and Election services), so
//! they check that those primitives compose the way etcd's own do.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use support::*;

/// An etcdctl process, killed by PID when dropped, whatever the test's outcome.
struct Etcdctl {
    child: Option<Child>,
}

impl Etcdctl {
    fn spawn(endpoints: &str, args: &[&str], stdout: &Path) -> Self {
        let out = std::fs::File::create(stdout).expect("output file");
        let child = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoints}"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("etcdctl is installed");
        Self { child: Some(child) }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGINT, which etcdctl handles by resigning or unlocking before it exits.
    fn interrupt(&self) {
        let status = Command::new("kill").arg("-INT").arg(self.pid().to_string()).status().expect("kill");
        assert!(status.success());
    }

    /// Whether it has exited, and with success.
    fn exited(&mut self) -> Option<bool> {
        let child = self.child.as_mut()?;
        child.try_wait().expect("try_wait").map(|status| status.success())
    }
}

impl Drop for Etcdctl {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

const CONTENDERS: usize = 5;
const ROUNDS: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_lock_admits_one_holder_at_a_time() {
    let cluster = TestCluster::start(3);
    cluster.leader().await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let log = dir.path().join("holders.log");
    // Each holder writes to the cluster between its two lines, so a second holder would
    // have time to interleave.
    let script = format!(
        "echo \"start $ETCD_LOCK_REV $ETCD_LOCK_KEY\" >> {log}; \
         ETCDCTL_API=3 etcdctl --endpoints={endpoints} put held \"$ETCD_LOCK_KEY\" >/dev/null; \
         echo \"end $ETCD_LOCK_REV $ETCD_LOCK_KEY\" >> {log}",
        log = log.display(),
        endpoints = cluster.endpoints(),
    );
    for round in 0..ROUNDS {
        let mut contenders: Vec<Etcdctl> = (0..CONTENDERS)
            .map(|i| {
                let endpoint = cluster.members[i % 3].endpoint();
                let out = dir.path().join(format!("contender-{round}-{i}.out"));
                Etcdctl::spawn(&endpoint, &["lock", "batch", "--", "sh", "-c", &script], &out)
            })
            .collect();
        eventually("every contender of the round done", || {
            let done = contenders.iter_mut().map(|c| c.exited()).collect::<Vec<_>>();
            async move {
                assert!(!done.contains(&Some(false)), "a contender failed");
                done.iter().all(Option::is_some).then_some(())
            }
        })
        .await;
    }

    let text = read(&log);
    let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(lines.len(), 2 * CONTENDERS * ROUNDS, "{text}");
    let mut last_revision = 0;
    for pair in lines.chunks(2) {
        let (start, end) = (&pair[0], &pair[1]);
        assert_eq!(start[0], "start", "holders never interleave:\n{text}");
        assert_eq!(end[0], "end", "holders never interleave:\n{text}");
        assert_eq!(start[1..], end[1..], "the same holder starts and ends:\n{text}");
        let revision: i64 = start[1].parse().expect("ETCD_LOCK_REV is a revision");
        assert!(revision > last_revision, "each holder's revision exceeds the last one's:\n{text}");
        assert!(start[2].starts_with("batch/"), "{text}");
        last_revision = revision;
    }
    assert!(keys_with_prefix(&cluster.members[0], "batch/").await.expect("range").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_elect_hands_over_when_the_leader_exits() {
    let cluster = TestCluster::start(3);
    cluster.leader().await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let out = |name: &str| dir.path().join(name);
    let observer =
        Etcdctl::spawn(&cluster.members[2].endpoint(), &["elect", "-l", "primary"], &out("observer"));
    let mut alpha =
        Etcdctl::spawn(&cluster.members[0].endpoint(), &["elect", "primary", "alpha"], &out("alpha"));
    // `elect` prints the leader key and the proposal once it leads.
    eventually("alpha elected", || async { read(&out("alpha")).contains("alpha").then_some(()) }).await;
    assert!(read(&out("alpha")).starts_with("primary/"), "{}", read(&out("alpha")));

    let beta = Etcdctl::spawn(&cluster.members[1].endpoint(), &["elect", "primary", "beta"], &out("beta"));
    eventually("beta campaigning", || async {
        (keys_with_prefix(&cluster.members[0], "primary/").await.ok()?.len() == 2).then_some(())
    })
    .await;
    eventually("the observer sees alpha", || async {
        read(&out("observer")).contains("alpha").then_some(())
    })
    .await;
    assert_eq!(read(&out("beta")), "", "one leader at a time");

    alpha.interrupt();
    eventually("alpha resigned and exited", || {
        let exited = alpha.exited();
        async move { exited.map(|_| ()) }
    })
    .await;
    eventually("beta elected", || async { read(&out("beta")).contains("beta").then_some(()) }).await;
    eventually("the observer sees beta after alpha", || async {
        let seen = read(&out("observer"));
        let (alpha_at, beta_at) = (seen.find("alpha")?, seen.find("beta")?);
        (alpha_at < beta_at).then_some(())
    })
    .await;
    drop((beta, observer));
}
