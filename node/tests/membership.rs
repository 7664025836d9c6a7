//! Changing the voter set with the Admin service (ChangeVoters, one joint-consensus step)
//! and rejoining a voter that lost its data, on real processes.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use consensus_node::proto::admin::admin_client::AdminClient;
use consensus_node::proto::admin::{ChangeVotersRequest, ChangeVotersResponse};
use consensus_node::proto::etcdserverpb::cluster_client::ClusterClient;
use consensus_node::proto::etcdserverpb::{MemberListRequest, RangeRequest};
use support::*;
use tonic::transport::Channel;

fn channel(member: &TestMember) -> Channel {
    tonic::transport::Endpoint::from_shared(member.client_url())
        .expect("valid url")
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(15))
        .connect_lazy()
}

async fn change_voters(member: &TestMember, ids: &[u64]) -> Result<ChangeVotersResponse, tonic::Status> {
    let request = ChangeVotersRequest { voter_ids: ids.to_vec() };
    AdminClient::new(channel(member)).change_voters(request).await.map(|r| r.into_inner())
}

/// (voters, learners) as `member` knows them, without asking the leader.
async fn roles(member: &TestMember) -> Option<(BTreeSet<u64>, BTreeSet<u64>)> {
    let list = ClusterClient::new(channel(member))
        .member_list(MemberListRequest { linearizable: false })
        .await
        .ok()?
        .into_inner();
    let voters = list.members.iter().filter(|m| !m.is_learner).map(|m| m.id).collect();
    let learners = list.members.iter().filter(|m| m.is_learner).map(|m| m.id).collect();
    Some((voters, learners))
}

async fn member_id(member: &TestMember) -> u64 {
    eventually("a member's status", || async { member.status().await?.header.map(|h| h.member_id) }).await
}

/// `etcdctl member add <name> --learner` for a new member of `cluster`, then starts it;
/// returns its index and id.
fn add_learner(cluster: &mut TestCluster, name: &str) -> (usize, u64) {
    let joiner = cluster.prepare_joiner(name);
    let peer_url = cluster.members[joiner].peer_url();
    let endpoints = cluster.endpoints();
    let added = ok(cluster
        .etcdctl(&endpoints, &["member", "add", name, "--learner", &format!("--peer-urls={peer_url}")]));
    let id = parse_added_id(&added);
    cluster.start_member(joiner);
    (joiner, id)
}

fn parse_added_id(etcdctl_output: &str) -> u64 {
    let hex = etcdctl_output
        .split_whitespace()
        .skip_while(|w| *w != "Member")
        .nth(1)
        .expect("member add prints the new ID");
    u64::from_str_radix(hex, 16).expect("hex member id")
}

fn assert_refused(result: Result<ChangeVotersResponse, tonic::Status>, message: &str) {
    let status = result.expect_err("the change is refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().starts_with("etcdserver: "), "{status:?}");
    assert!(status.message().contains(message), "{status:?}");
}

/// Retries while the learners are still catching up or leadership is moving (the only
/// refusals expected here).
async fn change_voters_once_ready(member: &TestMember, ids: &[u64]) -> ChangeVotersResponse {
    eventually("the learners to catch up and the change to commit", || async {
        match change_voters(member, ids).await {
            Ok(response) => Some(response),
            Err(status) if status.message().contains("in sync with leader") => None,
            Err(status) if status.code() == tonic::Code::Unavailable => None,
            Err(status) => panic!("ChangeVoters failed: {status:?}"),
        }
    })
    .await
}

/// Keys written with `prefix` that the cluster acknowledged, written until `stop`.
fn spawn_writer(
    member: &TestMember,
    prefix: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<String>> {
    let channel = channel(member);
    tokio::spawn(async move {
        let mut kv = consensus_node::proto::etcdserverpb::kv_client::KvClient::new(channel);
        let mut acknowledged = Vec::new();
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let key = format!("{prefix}{n:06}");
            n += 1;
            let request = consensus_node::proto::etcdserverpb::PutRequest {
                key: key.clone().into(),
                value: b"v".to_vec(),
                ..Default::default()
            };
            // A write may fail while leadership moves; only acknowledged ones must survive.
            if kv.put(request).await.is_ok() {
                acknowledged.push(key);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        acknowledged
    })
}

async fn keys_linearizable(member: &TestMember, prefix: &str) -> Option<BTreeSet<String>> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    let request = RangeRequest { key: prefix.into(), range_end: end, keys_only: true, ..Default::default() };
    let response = member.kv().await.range(request).await.ok()?.into_inner();
    Some(response.kvs.into_iter().map(|kv| String::from_utf8_lossy(&kv.key).into_owned()).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_voters_goes_from_three_to_five_and_back_without_an_even_voter_set() {
    let mut cluster = TestCluster::start(3);
    let leader = cluster.leader().await;
    let mut voters = BTreeSet::new();
    for m in &cluster.members {
        voters.insert(member_id(m).await);
    }
    let original: Vec<u64> = voters.iter().copied().collect();
    ok(cluster.etcdctl(&cluster.endpoints(), &["put", "before", "x"]));

    let (l3, id3) = add_learner(&mut cluster, "m3");
    let (l4, id4) = add_learner(&mut cluster, "m4");
    for learner in [l3, l4] {
        let member = &cluster.members[learner];
        eventually("a learner to receive the data", || async {
            (get(member, "before", true).await.ok()?.as_deref() == Some(b"x".as_slice())).then_some(())
        })
        .await;
    }
    // A member that is a voter throughout, and not the leader: answers are forwarded.
    let stays = (leader + 1) % 3;
    let (before_voters, before_learners) = roles(&cluster.members[stays]).await.expect("member list");
    assert_eq!(before_voters, voters);
    assert_eq!(before_learners, BTreeSet::from([id3, id4]));

    // Refusals, each leaving the membership as it was.
    let leader_id = member_id(&cluster.members[leader]).await;
    let others: Vec<u64> = original.iter().copied().filter(|id| *id != leader_id).collect();
    let on = &cluster.members[stays];
    assert_refused(change_voters(on, &[original[0], original[1], original[2], id3]).await, "odd number");
    assert_refused(change_voters(on, &[]).await, "odd number");
    assert_refused(change_voters(on, &[others[0], others[1], id3]).await, "move leadership first");
    assert_refused(change_voters(on, &[leader_id, others[0], 0x1234_5678]).await, "is not a member");
    // A learner that was added but never started has nothing of the log.
    let endpoints = cluster.endpoints();
    let unstarted = parse_added_id(&ok(cluster.etcdctl(
        &endpoints,
        &["member", "add", "m5", "--learner", &format!("--peer-urls=http://127.0.0.1:{}", free_port())],
    )));
    let everyone = [original[0], original[1], original[2], id3, unstarted];
    assert_refused(change_voters(on, &everyone).await, "in sync with leader");
    let (now_voters, now_learners) = roles(on).await.expect("member list");
    assert_eq!(now_voters, voters, "a refused change changed the voters");
    assert_eq!(now_learners, BTreeSet::from([id3, id4, unstarted]));
    ok(cluster.etcdctl(&endpoints, &["member", "remove", &format!("{unstarted:x}")]));

    // Sampled and written to through every change below, on a member that stays.
    let stop = Arc::new(AtomicBool::new(false));
    let taken = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let channel = channel(on);
        let (stop, taken) = (stop.clone(), taken.clone());
        tokio::spawn(async move {
            let mut client = ClusterClient::new(channel);
            let mut samples = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                if let Ok(list) = client.member_list(MemberListRequest { linearizable: false }).await {
                    samples.push(list.into_inner().members.iter().filter(|m| !m.is_learner).count());
                    taken.fetch_add(1, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            samples
        })
    };
    // The changes take well under a second: count samples rather than time, so the sampler
    // has surely run before, between and after them.
    let samples_after = |n: usize| {
        let taken = taken.clone();
        let target = taken.load(Ordering::SeqCst) + n;
        async move {
            eventually("the sampler to take more samples", || async {
                (taken.load(Ordering::SeqCst) >= target).then_some(())
            })
            .await
        }
    };
    samples_after(5).await;
    let writer = spawn_writer(on, "during/", stop.clone());

    let all = [original[0], original[1], original[2], id3, id4];
    let grown = change_voters_once_ready(on, &all).await;
    assert_eq!(grown.voter_ids.iter().copied().collect::<BTreeSet<_>>(), BTreeSet::from(all));
    assert!(grown.learner_ids.is_empty(), "{grown:?}");
    assert_eq!(grown.member_id, member_id(on).await);
    let (five, none) = roles(on).await.expect("member list");
    assert_eq!((five.len(), none.len()), (5, 0));
    samples_after(2).await;
    // The set it already has: nothing to do, and no error.
    let again = change_voters_once_ready(on, &all).await;
    assert_eq!(again.voter_ids.len(), 5);

    // Back to the original three: leadership first leaves a member that will be a learner.
    let leader = cluster.leader().await;
    let leader_id = member_id(&cluster.members[leader]).await;
    if !original.contains(&leader_id) {
        ok(cluster
            .etcdctl(&cluster.members[leader].endpoint(), &["move-leader", &format!("{:x}", original[0])]));
        eventually("leadership to move to an original voter", || async {
            let status = on.status().await?;
            original.contains(&status.leader).then_some(())
        })
        .await;
    }
    let shrunk = change_voters_once_ready(on, &original).await;
    assert_eq!(shrunk.voter_ids.iter().copied().collect::<BTreeSet<_>>(), voters);
    assert_eq!(shrunk.learner_ids.iter().copied().collect::<BTreeSet<_>>(), BTreeSet::from([id3, id4]));
    let (three, two) = roles(on).await.expect("member list");
    assert_eq!((three, two), (voters.clone(), BTreeSet::from([id3, id4])));

    let endpoints = cluster.members[stays].endpoint();
    ok(cluster.etcdctl(&endpoints, &["member", "remove", &format!("{id3:x}")]));
    ok(cluster.etcdctl(&endpoints, &["member", "remove", &format!("{id4:x}")]));
    let (three, none) = roles(on).await.expect("member list");
    assert_eq!((three, none.len()), (voters.clone(), 0));

    samples_after(5).await;
    stop.store(true, Ordering::SeqCst);
    let samples = sampler.await.expect("sampler");
    let acknowledged = writer.await.expect("writer");
    let max = samples.iter().copied().max().unwrap_or(0);
    let fives = samples.iter().filter(|n| **n == 5).count();
    eprintln!(
        "{} MemberList samples ({fives} with 5 voters), voters seen: max {max}, {} writes acknowledged",
        samples.len(),
        acknowledged.len()
    );
    assert!(samples.len() >= 10, "too few samples: {samples:?}");
    assert!(samples.iter().all(|n| n % 2 == 1), "an even voter count was seen: {samples:?}");
    assert_eq!(max, 5, "{samples:?}");
    assert!(!acknowledged.is_empty());
    let stored = eventually("a linearizable read of the writes", || keys_linearizable(on, "during/")).await;
    let missing: Vec<&String> = acknowledged.iter().filter(|k| !stored.contains(*k)).collect();
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
    assert_eq!(get(on, "before", false).await.expect("read").as_deref(), Some(b"x".as_slice()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_that_lost_its_data_rejoins_only_as_a_new_learner() {
    let mut cluster = TestCluster::start(3);
    let leader = cluster.leader().await;
    let endpoints = cluster.endpoints();
    for i in 0..20 {
        ok(cluster.etcdctl(&endpoints, &["put", &format!("data/{i:02}"), &i.to_string()]));
    }
    let cluster_id =
        cluster.members[leader].status().await.expect("status").header.expect("header").cluster_id;
    let lost = (leader + 1) % 3;
    let old_id = member_id(&cluster.members[lost]).await;
    // Its name is published: this voter has run, kept a log and voted.
    eventually("the voter's name to be published", || async {
        let list = stdout(&cluster.etcdctl(&endpoints, &["member", "list"]));
        list.lines()
            .any(|l| l.contains(&format!("{old_id:x}")) && l.contains(&cluster.members[lost].name))
            .then_some(())
    })
    .await;

    let member = &mut cluster.members[lost];
    member.terminate();
    std::fs::remove_dir_all(&member.data_dir).expect("wipe the data directory");
    member.set_cluster_state("existing");
    member.restart();
    let status = member.wait_exit();
    // A distinct exit code, so the operator replaces the member instead of restarting it.
    assert_eq!(status.code(), Some(78), "a voter with no data must not start");
    let log = member.log_text();
    assert!(log.contains("lost its data: it is a voter that has run before"), "{log}");
    assert!(log.contains(&format!("etcdctl member remove {old_id:x}")), "{log}");
    assert!(log.contains("--learner"), "{log}");
    eprintln!("refused: {}", log.lines().find(|l| l.contains("lost its data")).unwrap_or_default());

    // The way back: remove the old identity, add the same peer URL as a learner.
    let others: Vec<String> =
        cluster.members.iter().enumerate().filter(|(i, _)| *i != lost).map(|(_, m)| m.endpoint()).collect();
    let others = others.join(",");
    ok(cluster.etcdctl(&others, &["member", "remove", &format!("{old_id:x}")]));
    let peer_url = cluster.members[lost].peer_url();
    let name = cluster.members[lost].name.clone();
    let added =
        ok(cluster
            .etcdctl(&others, &["member", "add", &name, "--learner", &format!("--peer-urls={peer_url}")]));
    let new_id = parse_added_id(&added);
    assert_ne!(new_id, old_id, "a re-added member gets a new id");
    let member = &mut cluster.members[lost];
    std::fs::remove_dir_all(&member.data_dir).expect("wipe the data directory");
    member.restart();
    let member = &cluster.members[lost];
    eventually("the new learner to receive the data", || async {
        (get(member, "data/19", true).await.ok()?.as_deref() == Some(b"19".as_slice())).then_some(())
    })
    .await;
    let header = member.status().await.expect("status").header.expect("header");
    assert_eq!((header.member_id, header.cluster_id), (new_id, cluster_id));

    let leader = cluster.leader().await;
    let leader_id = member_id(&cluster.members[leader]).await;
    let third = member_id(&cluster.members[3 - leader - lost]).await;
    let response = change_voters_once_ready(&cluster.members[leader], &[leader_id, third, new_id]).await;
    assert_eq!(
        response.voter_ids.iter().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([leader_id, third, new_id])
    );
    let (voters, learners) = roles(&cluster.members[lost]).await.expect("member list");
    assert_eq!((voters, learners.len()), (BTreeSet::from([leader_id, third, new_id]), 0));
    assert_eq!(
        get(&cluster.members[lost], "data/00", false).await.expect("read").as_deref(),
        Some(b"0".as_slice())
    );
}
