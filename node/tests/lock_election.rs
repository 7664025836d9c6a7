//! etcd's server-side Lock and Election services through the Rust `etcd-client` crate,
//! against a 3-member cluster, each client on its own member.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use etcd_client::{Client, LockOptions, ProclaimOptions, ResignOptions};
use support::*;

async fn client(member: &TestMember) -> Client {
    Client::connect([member.endpoint()], None).await.expect("etcd-client connects")
}

async fn lease(client: &mut Client, ttl: i64) -> i64 {
    client.lease_grant(ttl, None).await.expect("lease granted").id()
}

/// The gRPC status inside an etcd-client error.
fn status(error: etcd_client::Error) -> tonic::Status {
    match error {
        etcd_client::Error::GRpcStatus(status) => status,
        other => panic!("expected a gRPC status, got {other}"),
    }
}

const CONTENDERS: usize = 5;
const ROUNDS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_admits_one_holder_at_a_time_in_key_revision_order() {
    let cluster = TestCluster::start(3);
    cluster.leader().await;
    let inside = Arc::new(AtomicUsize::new(0));
    let most_inside = Arc::new(AtomicUsize::new(0));
    // (contender, the lock key's create revision) in the order holders entered.
    let log: Arc<Mutex<Vec<(usize, i64)>>> = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for contender in 0..CONTENDERS {
        let mut client = client(&cluster.members[contender % 3]).await;
        let (inside, most_inside, log) = (inside.clone(), most_inside.clone(), log.clone());
        tasks.push(tokio::spawn(async move {
            let lease = lease(&mut client, 60).await;
            for round in 0..ROUNDS {
                let locked = client
                    .lock("jobs/nightly", Some(LockOptions::new().with_lease(lease)))
                    .await
                    .expect("lock acquired");
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most_inside.fetch_max(now, Ordering::SeqCst);
                let key = locked.key().to_vec();
                let revision = locked.header().expect("header").revision();
                let stored = client.get(key.clone(), None).await.expect("lock key readable");
                let kv = stored.kvs().first().expect("the lock key exists while held");
                assert_eq!(kv.create_revision(), revision, "the header carries the key's revision");
                assert_eq!(kv.lease(), lease);
                log.lock().expect("log").push((contender, revision));
                // Work under the lock that takes a round trip through the log, so the
                // others have time to queue up behind it.
                client.put(format!("jobs/work/{contender}"), format!("{round}"), None).await.expect("put");
                inside.fetch_sub(1, Ordering::SeqCst);
                client.unlock(key).await.expect("unlock");
            }
        }));
    }
    for task in tasks {
        task.await.expect("contender finished");
    }
    assert_eq!(most_inside.load(Ordering::SeqCst), 1, "never two holders at once");
    let log = log.lock().expect("log").clone();
    assert_eq!(log.len(), CONTENDERS * ROUNDS);
    for pair in log.windows(2) {
        assert!(pair[1].1 > pair[0].1, "each holder's key revision exceeds the last holder's: {log:?}");
    }
    // Every contender held it ROUNDS times, and the lock keys are gone.
    for contender in 0..CONTENDERS {
        assert_eq!(log.iter().filter(|(c, _)| *c == contender).count(), ROUNDS);
    }
    assert!(keys_with_prefix(&cluster.members[0], "jobs/nightly/").await.expect("range").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_waiters_whose_lease_goes_stop_with_an_error() {
    let cluster = TestCluster::start(3);
    cluster.leader().await;
    let mut holder = client(&cluster.members[0]).await;
    let held_under = lease(&mut holder, 60).await;
    let held = holder.lock("db", Some(LockOptions::new().with_lease(held_under))).await.expect("lock");
    assert!(held.key().starts_with(b"db/"));

    // Revoked while waiting.
    let mut waiter = client(&cluster.members[1]).await;
    let revoked = lease(&mut waiter, 60).await;
    let mut revoking = waiter.clone();
    let wait =
        tokio::spawn(async move { waiter.lock("db", Some(LockOptions::new().with_lease(revoked))).await });
    eventually("the waiter's key in the queue", || async {
        (keys_with_prefix(&cluster.members[0], "db/").await.ok()?.len() == 2).then_some(())
    })
    .await;
    assert!(!wait.is_finished(), "a waiter does not get a held lock");
    revoking.lease_revoke(revoked).await.expect("revoke");
    let error = status(wait.await.expect("task").expect_err("the revoked waiter fails"));
    assert_eq!(error.code(), tonic::Code::NotFound);
    assert_eq!(error.message(), "etcdserver: requested lease not found");

    // Expired while waiting: nobody keeps the lease alive.
    let mut waiter = client(&cluster.members[2]).await;
    let expiring = lease(&mut waiter, 2).await;
    let error = status(
        waiter
            .lock("db", Some(LockOptions::new().with_lease(expiring)))
            .await
            .expect_err("expired waiter fails"),
    );
    assert_eq!(error.code(), tonic::Code::NotFound);
    assert_eq!(error.message(), "etcdserver: requested lease not found");

    // A lease that does not exist never joins the queue; the holder still holds the lock.
    let error = status(
        holder.lock("db", Some(LockOptions::new().with_lease(0x1234))).await.expect_err("unknown lease"),
    );
    assert_eq!(error.message(), "etcdserver: requested lease not found");
    assert_eq!(keys_with_prefix(&cluster.members[0], "db/").await.expect("range").len(), 1);

    // Locking again under the same lease finds the held key instead of queueing behind it.
    let again = holder.lock("db", Some(LockOptions::new().with_lease(held_under))).await.expect("relock");
    assert_eq!(again.key(), held.key());
    holder.unlock(held.key()).await.expect("unlock");
    assert!(keys_with_prefix(&cluster.members[0], "db/").await.expect("range").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_lock_waiter_leaves_the_queue() {
    let cluster = TestCluster::start(3);
    cluster.leader().await;
    let mut holder = client(&cluster.members[0]).await;
    let held_under = lease(&mut holder, 60).await;
    let held = holder.lock("q", Some(LockOptions::new().with_lease(held_under))).await.expect("lock");
    let mut waiter = client(&cluster.members[1]).await;
    let waiting_under = lease(&mut waiter, 60).await;
    let wait =
        tokio::spawn(
            async move { waiter.lock("q", Some(LockOptions::new().with_lease(waiting_under))).await },
        );
    eventually("the waiter's key in the queue", || async {
        (keys_with_prefix(&cluster.members[0], "q/").await.ok()?.len() == 2).then_some(())
    })
    .await;
    // The client goes away: its call is cancelled, and its key must not block later waiters
    // until its lease runs out.
    wait.abort();
    eventually("the abandoned key released", || async {
        let keys = keys_with_prefix(&cluster.members[0], "q/").await.ok()?;
        (keys == [String::from_utf8_lossy(held.key()).into_owned()]).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election_leader_is_observed_and_followed_on_resign_and_on_lease_loss() {
    let cluster = TestCluster::start(3);
    cluster.leader().await;
    let mut observer = client(&cluster.members[2]).await;
    let error = status(observer.leader("primary").await.expect_err("no leader yet"));
    assert_eq!(error.code(), tonic::Code::NotFound);
    assert_eq!(error.message(), "etcdserver: election: no leader");
    let mut observed = observer.observe("primary").await.expect("observe");

    let mut first = client(&cluster.members[0]).await;
    let first_lease = lease(&mut first, 60).await;
    let won = first.campaign("primary", "one", first_lease).await.expect("first campaign");
    let first_key = won.leader().expect("leader key").clone();
    assert_eq!(first_key.lease(), first_lease);
    let seen = observed.message().await.expect("observe").expect("a leader");
    assert_eq!(seen.kv().expect("kv").value(), b"one");
    assert_eq!(seen.kv().expect("kv").create_revision(), first_key.rev());

    let mut second = client(&cluster.members[1]).await;
    let second_lease = lease(&mut second, 60).await;
    let mut second_campaigner = second.clone();
    let campaign =
        tokio::spawn(async move { second_campaigner.campaign("primary", "two", second_lease).await });
    eventually("the second campaigner in the queue", || async {
        (keys_with_prefix(&cluster.members[0], "primary/").await.ok()?.len() == 2).then_some(())
    })
    .await;
    assert!(!campaign.is_finished(), "one leader at a time");
    assert_eq!(observer.leader("primary").await.expect("leader").kv().expect("kv").value(), b"one");

    // The leader proclaims; a campaigner still waiting cannot, even with its own real key.
    first
        .proclaim("one-b", Some(ProclaimOptions::new().with_leader(first_key.clone())))
        .await
        .expect("proclaim");
    let seen = observed.message().await.expect("observe").expect("a leader");
    assert_eq!(seen.kv().expect("kv").value(), b"one-b");
    let pretender = etcd_client::LeaderKey::new()
        .with_name("primary")
        .with_key(format!("primary/{second_lease:x}"))
        .with_rev(first_key.rev() + 1)
        .with_lease(second_lease);
    let error = status(
        second
            .proclaim("mine", Some(ProclaimOptions::new().with_leader(pretender)))
            .await
            .expect_err("not leader"),
    );
    assert_eq!(error.code(), tonic::Code::FailedPrecondition);
    assert_eq!(error.message(), "etcdserver: election: not leader");

    // Resign: the second campaigner takes over, and the observer sees it.
    first.resign(Some(ResignOptions::new().with_leader(first_key.clone()))).await.expect("resign");
    let won = campaign.await.expect("task").expect("second campaign");
    let second_key = won.leader().expect("leader key").clone();
    assert!(second_key.rev() > first_key.rev());
    let seen = observed.message().await.expect("observe").expect("a leader");
    assert_eq!(seen.kv().expect("kv").value(), b"two");
    // The first no longer leads, so its proclamations are refused.
    let error = status(
        first
            .proclaim("stale", Some(ProclaimOptions::new().with_leader(first_key)))
            .await
            .expect_err("resigned"),
    );
    assert_eq!(error.code(), tonic::Code::FailedPrecondition);

    // Lease loss: a third campaigner takes over when the second's lease is revoked.
    let mut third = client(&cluster.members[2]).await;
    let third_lease = lease(&mut third, 60).await;
    let mut third_campaigner = third.clone();
    let campaign =
        tokio::spawn(async move { third_campaigner.campaign("primary", "three", third_lease).await });
    eventually("the third campaigner in the queue", || async {
        (keys_with_prefix(&cluster.members[0], "primary/").await.ok()?.len() == 2).then_some(())
    })
    .await;
    assert!(!campaign.is_finished(), "one leader at a time");
    second.lease_revoke(second_lease).await.expect("revoke");
    let won = campaign.await.expect("task").expect("third campaign");
    assert!(won.leader().expect("leader key").rev() > second_key.rev());
    let seen = observed.message().await.expect("observe").expect("a leader");
    assert_eq!(seen.kv().expect("kv").value(), b"three");
    assert_eq!(observer.leader("primary").await.expect("leader").kv().expect("kv").value(), b"three");
}
