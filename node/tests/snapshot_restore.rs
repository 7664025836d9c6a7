//! Maintenance: Snapshot (saved by Debian's etcdctl 3.4) and `consensus-node restore` into a
//! new cluster, HashKV agreement across members, Defragment under writes.

mod support;

use std::path::Path;

use consensus_node::proto::etcdserverpb::maintenance_client::MaintenanceClient;
use consensus_node::proto::etcdserverpb::{
    DeleteRangeRequest, HashKvRequest, HashKvResponse, HashRequest, SnapshotRequest,
};
use sha2::{Digest, Sha256};
use support::*;

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn maintenance(member: &TestMember) -> MaintenanceClient<tonic::transport::Channel> {
    let channel =
        tonic::transport::Endpoint::from_shared(member.client_url()).expect("valid url").connect_lazy();
    MaintenanceClient::new(channel)
}

/// The cluster id `member` reports, as etcdctl shows it.
fn cluster_id(endpoint: &str) -> u64 {
    let status = json(&ok(etcdctl(endpoint, &["endpoint", "status", "-w", "json"], None)));
    status[0]["Status"]["header"]["cluster_id"].as_u64().expect("cluster_id")
}

fn restore_args(snapshot: &str, cluster: &TestCluster, member: &TestMember) -> Vec<String> {
    vec![
        "restore".into(),
        "--snapshot".into(),
        snapshot.into(),
        "--data-dir".into(),
        member.data_dir.display().to_string(),
        "--name".into(),
        member.name.clone(),
        "--initial-cluster".into(),
        cluster.initial_cluster(),
        "--initial-cluster-token".into(),
        "restored".into(),
        "--initial-advertise-peer-urls".into(),
        member.peer_url(),
    ]
}

fn run_restore(args: &[String]) -> std::process::Output {
    consensus_node(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn is_empty_or_absent(dir: &Path) -> bool {
    std::fs::read_dir(dir).map(|mut entries| entries.next().is_none()).unwrap_or(true)
}

/// `/a` as etcdctl reports it on `endpoint`: (value, create, mod revision, version).
fn key_a(endpoint: &str) -> (String, i64, i64, i64) {
    let got = json(&ok(etcdctl(endpoint, &["get", "/a", "-w", "json"], None)));
    let kv = &got["kvs"][0];
    let value = kv["value"].as_str().expect("value (base64)");
    (
        value.to_owned(),
        kv["create_revision"].as_i64().expect("create_revision"),
        kv["mod_revision"].as_i64().expect("mod_revision"),
        kv["version"].as_i64().expect("version"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_snapshot_restores_into_a_new_cluster() {
    let original = TestCluster::start(3);
    let leader = original.leader().await;
    let endpoints = original.endpoints();
    ok(original.etcdctl(&endpoints, &["put", "/a", "1"]));
    ok(original.etcdctl(&endpoints, &["put", "/b", "2"]));
    ok(original.etcdctl(&endpoints, &["put", "/a", "3"]));
    ok(original.etcdctl(&endpoints, &["put", "/gone", "x"]));
    ok(original.etcdctl(&endpoints, &["del", "/gone"]));
    // Enough data that the snapshot travels in several 64 KiB chunks.
    let big = "v".repeat(2048);
    for i in 0..100 {
        put(&original.members[leader], &format!("/bulk/{i:03}"), &big).await.expect("put");
    }
    let before = key_a(&endpoints);
    let original_id = cluster_id(&original.members[0].endpoint());

    let saved = tempfile::tempdir().expect("tempdir");
    let file = saved.path().join("backup.db");
    let file_arg = file.display().to_string();
    ok(etcdctl(&original.members[1].endpoint(), &["snapshot", "save", &file_arg], None));
    let bytes = std::fs::read(&file).expect("snapshot file");
    assert!(bytes.len() > 3 * 64 * 1024, "snapshot of {} bytes", bytes.len());
    let (body, checksum) = bytes.split_at(bytes.len() - 32);
    assert_eq!(Sha256::digest(body).as_slice(), checksum, "the file ends with the SHA-256 of the rest");

    let mut restored = TestCluster::prepare_with_token(3, "restored");
    for member in &restored.members {
        let output = run_restore(&restore_args(&file_arg, &restored, member));
        ok(output);
    }
    for i in 0..restored.members.len() {
        restored.start_member(i);
    }
    restored.leader().await;
    let new_endpoints = restored.endpoints();

    // Every key, at the revisions the original cluster gave it, on every member.
    assert_eq!(key_a(&new_endpoints), before);
    for member in &restored.members {
        let bulk = eventually("the bulk keys on every restored member", || async {
            let keys = keys_with_prefix(member, "/bulk/").await.ok()?;
            (keys.len() == 100).then_some(keys)
        })
        .await;
        assert_eq!(bulk[0], "/bulk/000");
        assert_eq!(ok(etcdctl(&member.endpoint(), &["get", "/b", "--print-value-only"], None)).trim(), "2");
        assert!(ok(etcdctl(&member.endpoint(), &["get", "/gone"], None)).trim().is_empty());
    }
    let new_id = cluster_id(&restored.members[0].endpoint());
    assert_ne!(new_id, original_id, "a restored cluster is a new cluster");
    for member in &restored.members {
        assert_eq!(cluster_id(&member.endpoint()), new_id);
    }

    // Writes continue from the snapshot's revision.
    ok(etcdctl(&new_endpoints, &["put", "/after", "restore"], None));
    let after = json(&ok(etcdctl(&new_endpoints, &["get", "/after", "-w", "json"], None)));
    assert!(after["kvs"][0]["mod_revision"].as_i64().expect("mod_revision") > before.2);

    // A member added later has no log to catch up from (the log before the restore point
    // never existed): it must be sent the snapshot.
    let joiner = restored.prepare_joiner("m3");
    let peer_url = restored.members[joiner].peer_url();
    ok(etcdctl(
        &new_endpoints,
        &["member", "add", "m3", "--learner", &format!("--peer-urls={peer_url}")],
        None,
    ));
    restored.start_member(joiner);
    let learner = &restored.members[joiner];
    eventually("the joiner to receive the restored data", || async {
        let a = get(learner, "/a", true).await.ok()??;
        let after = get(learner, "/after", true).await.ok()??;
        (a == b"3" && after == b"restore").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_refuses_a_damaged_snapshot_and_a_used_data_dir() {
    let cluster = TestCluster::start(1);
    cluster.leader().await;
    let endpoint = cluster.endpoints();
    ok(cluster.etcdctl(&endpoint, &["put", "k", "v"]));
    let work = tempfile::tempdir().expect("tempdir");
    let good = work.path().join("good.db");
    ok(etcdctl(&endpoint, &["snapshot", "save", &good.display().to_string()], None));

    let target = TestCluster::prepare_with_token(1, "restored");
    let member = &target.members[0];

    let mut bytes = std::fs::read(&good).expect("snapshot");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    let damaged = work.path().join("damaged.db");
    std::fs::write(&damaged, &bytes).expect("write damaged copy");
    let output = run_restore(&restore_args(&damaged.display().to_string(), &target, member));
    assert!(!output.status.success(), "a damaged snapshot is restored");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("checksum mismatch"), "{stderr}");
    assert!(is_empty_or_absent(&member.data_dir), "restore left files behind");
    let leftovers: Vec<_> = std::fs::read_dir(target.dir.path())
        .expect("read dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert!(leftovers.is_empty(), "restore left {leftovers:?}");

    std::fs::create_dir_all(&member.data_dir).expect("mkdir");
    std::fs::write(member.data_dir.join("precious"), b"data").expect("write");
    let output = run_restore(&restore_args(&good.display().to_string(), &target, member));
    assert!(!output.status.success(), "a used data directory is overwritten");
    assert!(String::from_utf8_lossy(&output.stderr).contains("not empty"), "{output:?}");
    let entries: Vec<_> =
        std::fs::read_dir(&member.data_dir).expect("read dir").filter_map(Result::ok).collect();
    assert_eq!(entries.len(), 1, "restore changed the data directory");

    // The intact file restores into an empty directory.
    std::fs::remove_file(member.data_dir.join("precious")).expect("rm");
    ok(run_restore(&restore_args(&good.display().to_string(), &target, member)));
    assert!(member.data_dir.join("member").join("identity.json").exists());
}

/// The operator's recovery replaces a member's data by a restore that it may run more than
/// once: what was there is kept aside, a staging directory left by an interrupted try is
/// cleared, and a repeat of the same restore changes nothing, also after the member ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_replace_into_keeps_the_old_data_and_a_repeat_changes_nothing() {
    let source = TestCluster::start(1);
    source.leader().await;
    let endpoint = source.endpoints();
    ok(source.etcdctl(&endpoint, &["put", "k", "v"]));
    let work = tempfile::tempdir().expect("tempdir");
    let snapshot = work.path().join("snap.db").display().to_string();
    ok(etcdctl(&endpoint, &["snapshot", "save", &snapshot], None));

    let mut target = TestCluster::prepare_with_token(1, "restored");
    let data_dir = target.members[0].data_dir.clone();
    std::fs::create_dir_all(&data_dir).expect("mkdir");
    std::fs::write(data_dir.join("old-member"), b"old data").expect("write");
    // Damaged past reading who it was: replaced all the same, kept as it is.
    std::fs::create_dir_all(data_dir.join("member")).expect("mkdir");
    std::fs::write(data_dir.join("member").join("identity.json"), b"\x00garbage").expect("write");
    let name = data_dir.file_name().expect("a name").to_string_lossy().into_owned();
    let staging = data_dir.with_file_name(format!(".{name}.restoring"));
    std::fs::create_dir_all(staging.join("half")).expect("a leftover staging directory");
    let keep = work.path().join("replaced");
    let mut args = restore_args(&snapshot, &target, &target.members[0]);
    args.extend(["--replace-into".to_owned(), keep.display().to_string()]);

    let first = ok(run_restore(&args));
    assert_eq!(std::fs::read(keep.join(&name).join("old-member")).expect("kept"), b"old data");
    assert!(!staging.exists(), "the leftover staging directory is cleared");
    assert!(data_dir.join("member").join("identity.json").exists());
    target.start_member(0);
    target.leader().await;
    ok(target.etcdctl(&target.endpoints(), &["put", "after", "restore"]));
    target.members[0].terminate();

    // Run again (a Job retried after its pod was lost): the member and its new write stay.
    let again = ok(run_restore(&args));
    let member_of = |said: &str| said.rsplit_once(": ").map(|(_, who)| who.to_owned());
    assert_eq!(member_of(&again), member_of(&first), "the same member: {first} / {again}");
    assert!(!keep.join(format!("{name}.1")).exists(), "a repeat moves nothing aside");
    target.members[0].restart();
    target.leader().await;
    let member = &target.members[0];
    assert_eq!(get(member, "k", true).await.expect("get").as_deref(), Some(&b"v"[..]));
    assert_eq!(get(member, "after", true).await.expect("get").as_deref(), Some(&b"restore"[..]));

    // Another snapshot's restore does replace it, the first replacement kept beside the old.
    target.members[0].terminate();
    let mut other = restore_args(&snapshot, &target, &target.members[0]);
    let token = other.iter().position(|a| a == "restored").expect("the token");
    other[token] = "restored-again".to_owned();
    other.extend(["--replace-into".to_owned(), keep.display().to_string()]);
    ok(run_restore(&other));
    assert!(keep.join(format!("{name}.1")).join("member").exists(), "the first restore kept aside");
}

async fn hash_kv(member: &TestMember, revision: i64) -> Option<HashKvResponse> {
    let request = HashKvRequest { revision };
    maintenance(member).hash_kv(request).await.ok().map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_kv_is_equal_on_every_member() {
    let cluster = TestCluster::start(3);
    let leader = cluster.leader().await;
    let member = &cluster.members[leader];
    for i in 0..20 {
        put(member, &format!("key{}", i % 7), &format!("value{i}")).await.expect("put");
    }
    let delete = DeleteRangeRequest { key: b"key3".to_vec(), ..DeleteRangeRequest::default() };
    member.kv().await.delete_range(delete).await.expect("delete");
    let revision = put(member, "last", "x").await.expect("put");

    let mut hashes = Vec::new();
    for m in &cluster.members {
        // A member that has not applied `revision` yet answers "future revision".
        let at = eventually("HashKV at the last revision", || hash_kv(m, revision)).await;
        assert_eq!(at.hash_revision, revision);
        assert_eq!(at.compact_revision, 0);
        let current = eventually("HashKV at the current revision", || hash_kv(m, 0)).await;
        assert_eq!((current.hash, current.hash_revision), (at.hash, revision));
        hashes.push(at.hash);
    }
    assert!(hashes.iter().all(|h| *h == hashes[0]), "members disagree: {hashes:?}");

    // Earlier revisions hash differently, and agree too.
    let earlier: Vec<u32> = {
        let mut earlier = Vec::new();
        for m in &cluster.members {
            earlier.push(hash_kv(m, revision - 1).await.expect("HashKV").hash);
        }
        earlier
    };
    assert!(earlier.iter().all(|h| *h == earlier[0]), "{earlier:?}");
    assert_ne!(earlier[0], hashes[0]);

    let future = maintenance(member).hash_kv(HashKvRequest { revision: revision + 100 }).await;
    let status = future.expect_err("a future revision");
    assert_eq!(status.code(), tonic::Code::OutOfRange);
    assert!(status.message().contains("future revision"), "{status:?}");

    // etcdctl reads the same hashes.
    let text = ok(cluster.etcdctl(&cluster.endpoints(), &["endpoint", "hashkv", "-w", "json"]));
    let listed = json(&text);
    let etcdctl_hashes: Vec<u64> = listed
        .as_array()
        .expect("array")
        .iter()
        .map(|e| e["HashKV"]["hash"].as_u64().expect("hash"))
        .collect();
    assert_eq!(etcdctl_hashes, vec![u64::from(hashes[0]); 3], "{text}");

    // Hash covers the whole store and follows its changes.
    let whole = maintenance(member).hash(HashRequest {}).await.expect("Hash").into_inner();
    put(member, "one-more", "y").await.expect("put");
    let changed = maintenance(member).hash(HashRequest {}).await.expect("Hash").into_inner();
    assert_ne!(whole.hash, changed.hash);
    assert!(changed.header.expect("header").revision > whole.header.expect("header").revision);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defragment_keeps_the_data_and_serves_writes_meanwhile() {
    let cluster = TestCluster::start(3);
    let leader = cluster.leader().await;
    let big = "d".repeat(4096);
    for i in 0..50 {
        put(&cluster.members[leader], &format!("/keep/{i:02}"), &big).await.expect("put");
    }
    let delete = DeleteRangeRequest {
        key: b"/keep/".to_vec(),
        range_end: b"/keep/2".to_vec(),
        ..DeleteRangeRequest::default()
    };
    cluster.members[leader].kv().await.delete_range(delete).await.expect("delete");

    // Writes keep coming while every member defragments.
    let writer_member = cluster.members[leader].client_url();
    let writer = tokio::spawn(async move {
        let channel = tonic::transport::Endpoint::from_shared(writer_member).expect("url").connect_lazy();
        let mut kv = consensus_node::proto::etcdserverpb::kv_client::KvClient::new(channel);
        for i in 0..100 {
            let request = consensus_node::proto::etcdserverpb::PutRequest {
                key: format!("/during/{i:03}").into_bytes(),
                value: b"w".to_vec(),
                ..Default::default()
            };
            kv.put(request).await.expect("a write during defragmentation");
        }
    });
    let text = ok(cluster.etcdctl(&cluster.endpoints(), &["defrag"]));
    assert_eq!(text.matches("Finished defragmenting etcd member").count(), 3, "{text}");
    writer.await.expect("writer");

    for member in &cluster.members {
        let kept = eventually("the data after defragmentation", || async {
            let kept = keys_with_prefix(member, "/keep/").await.ok()?;
            let during = keys_with_prefix(member, "/during/").await.ok()?;
            (during.len() == 100).then_some(kept)
        })
        .await;
        assert_eq!(kept.len(), 30, "{kept:?}");
        assert_eq!(get(member, "/keep/49", true).await.expect("get"), Some(big.clone().into_bytes()));
        let status = member.status().await.expect("status");
        assert!(status.db_size > 0);
        assert!(
            status.db_size_in_use > 0 && status.db_size_in_use <= status.db_size,
            "{} of {}",
            status.db_size_in_use,
            status.db_size
        );
    }
    ok(cluster.etcdctl(&cluster.endpoints(), &["put", "/after-defrag", "ok"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_stream_counts_down_and_ends_with_its_checksum() {
    let cluster = TestCluster::start(1);
    cluster.leader().await;
    let member = &cluster.members[0];
    let big = "s".repeat(8192);
    for i in 0..20 {
        put(member, &format!("k{i}"), &big).await.expect("put");
    }
    let mut stream = maintenance(member).snapshot(SnapshotRequest {}).await.expect("Snapshot").into_inner();
    let mut messages = Vec::new();
    while let Some(message) = stream.message().await.expect("snapshot message") {
        messages.push(message);
    }
    assert!(messages.len() >= 3, "{} messages", messages.len());
    let (last, data) = messages.split_last().expect("messages");
    assert_eq!(last.remaining_bytes, 0);
    assert_eq!(last.blob.len(), 32);
    let body: Vec<u8> = data.iter().flat_map(|m| m.blob.iter().copied()).collect();
    assert_eq!(Sha256::digest(&body).as_slice(), last.blob.as_slice());
    // etcdctl refuses a saved snapshot unless its length is 32 more than a multiple of 512.
    assert_eq!(body.len() % 512, 0);
    let mut sent = 0u64;
    for message in data {
        assert!(message.blob.len() <= 64 * 1024);
        sent += message.blob.len() as u64;
        assert_eq!(message.remaining_bytes, body.len() as u64 - sent);
    }
    assert!(!last.version.is_empty());
}
