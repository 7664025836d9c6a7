//! `consensus-node backup` against a real S3-compatible server in-process (s3s-fs, its
//! buckets directories under a temporary root) and a directory: the stored object is the
//! snapshot as it is, its manifest says what it holds, it restores into a new cluster with
//! every key, and bad input (wrong credentials, a missing bucket, an unreachable store or
//! member) is a clear error that stores nothing.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use consensus_e2e::s3::{self, ACCESS_KEY, SECRET_KEY};
use consensus_node::backup::{Manifest, Report};
use sha2::{Digest, Sha256};
use support::*;

/// `consensus-node backup` with `args`, the test's S3 credentials in its environment.
fn backup(args: &[&str], secret: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_consensus-node"))
        .arg("backup")
        .args(args)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("consensus-node runs")
}

fn manifest(output: Output) -> Manifest {
    report(output).manifest
}

fn report(output: Output) -> Report {
    serde_json::from_str(ok(output).trim()).expect("the report on stdout")
}

/// A 3-member cluster holding `/a` .. and 100 keys of 2 KiB (several snapshot chunks).
async fn cluster_with_data() -> (TestCluster, String) {
    let cluster = TestCluster::start(3);
    let leader = cluster.leader().await;
    let endpoints = cluster.endpoints();
    ok(cluster.etcdctl(&endpoints, &["put", "/a", "1"]));
    ok(cluster.etcdctl(&endpoints, &["put", "/a", "2"]));
    let big = "v".repeat(2048);
    for i in 0..100 {
        put(&cluster.members[leader], &format!("/bulk/{i:03}"), &big).await.expect("put");
    }
    let follower = cluster.members[(leader + 1) % 3].client_url();
    (cluster, follower)
}

/// Restores `snapshot` into a new one-member cluster and returns the keys under `/`.
async fn restored_keys(snapshot: &Path) -> Vec<String> {
    let mut restored = TestCluster::prepare_with_token(1, "from-backup");
    let member = &restored.members[0];
    let restore = [
        "restore",
        "--snapshot",
        &snapshot.display().to_string(),
        "--data-dir",
        &member.data_dir.display().to_string(),
        "--name",
        &member.name,
        "--initial-cluster",
        &restored.initial_cluster(),
        "--initial-cluster-token",
        "from-backup",
        "--initial-advertise-peer-urls",
        &member.peer_url(),
    ]
    .map(str::to_owned);
    ok(consensus_node(&restore.iter().map(String::as_str).collect::<Vec<_>>()));
    restored.start_member(0);
    restored.leader().await;
    keys_with_prefix(&restored.members[0], "/").await.expect("the restored keys")
}

fn assert_stored_as_the_manifest_says(file: &Path, manifest: &Manifest) {
    let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    assert_eq!(bytes.len() as u64, manifest.size_bytes);
    assert_eq!(hex::encode(Sha256::digest(&bytes)), manifest.sha256);
    let (body, checksum) = bytes.split_at(bytes.len() - 32);
    assert_eq!(Sha256::digest(body).as_slice(), checksum, "stored as the snapshot file it is");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_to_s3_is_the_snapshot_with_its_manifest_and_restores_every_key() {
    let (cluster, follower) = cluster_with_data().await;
    let (root, s3) = s3::with_bucket("backups").await;
    let revision = cluster.members[0].status().await.expect("status").header.expect("header").revision;

    let args = ["--endpoint", &follower, "--to", "s3://backups/prod/demo", "--name", "demo-1"];
    let manifest =
        manifest(backup(&[&args[..], &["--s3-endpoint", &s3, "--s3-path-style"]].concat(), SECRET_KEY));

    assert_eq!(manifest.location, "s3://backups/prod/demo/demo-1.snapshot");
    assert!(manifest.revision >= revision, "revision {} before {revision}", manifest.revision);
    assert!(manifest.size_bytes > 3 * 64 * 1024, "{} bytes", manifest.size_bytes);
    assert!(!manifest.cluster_id.is_empty() && manifest.hash_kv != 0, "{manifest:?}");
    let object = root.path().join("backups/prod/demo/demo-1.snapshot");
    assert_stored_as_the_manifest_says(&object, &manifest);
    let stored: Manifest = serde_json::from_slice(
        &std::fs::read(root.path().join("backups/prod/demo/demo-1.json")).expect("the manifest object"),
    )
    .expect("a manifest");
    assert_eq!(stored, manifest);

    let keys = restored_keys(&object).await;
    assert_eq!(keys.len(), 101, "{keys:?}");
    assert_eq!(keys[0], "/a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_to_a_directory_lands_whole_under_its_name() {
    let (_cluster, follower) = cluster_with_data().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let to = format!("file://{}", dir.path().join("nightly").display());

    let manifest = manifest(backup(&["--endpoint", &follower, "--to", &to, "--name", "n1"], SECRET_KEY));

    let object = dir.path().join("nightly/n1.snapshot");
    assert_eq!(manifest.location, format!("{to}/n1.snapshot"));
    assert_stored_as_the_manifest_says(&object, &manifest);
    let names = file_names(&dir.path().join("nightly"));
    assert_eq!(names, ["n1.json", "n1.snapshot"], "nothing staged is left behind");
    assert_eq!(restored_keys(&object).await.len(), 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_clear_error_and_stores_nothing() {
    let (_cluster, follower) = cluster_with_data().await;
    let (root, s3) = s3::with_bucket("backups").await;
    let to_s3 = |bucket: &str, endpoint: &str, secret: &str| {
        let to = format!("s3://{bucket}/p");
        let args = [
            "--endpoint",
            &follower,
            "--to",
            &to,
            "--name",
            "x",
            "--s3-endpoint",
            endpoint,
            "--s3-path-style",
        ];
        backup(&args, secret)
    };
    let failed = |output: Output, expected: &str| {
        assert!(!output.status.success(), "succeeded: {}", String::from_utf8_lossy(&output.stdout));
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(stderr.contains(expected), "{expected:?} not in: {stderr}");
    };

    failed(to_s3("backups", &s3, "wrong-secret"), "s3://backups/p cannot be listed");
    failed(to_s3("no-such-bucket", &s3, SECRET_KEY), "s3://no-such-bucket");
    let closed = format!("http://127.0.0.1:{}", free_port());
    failed(to_s3("backups", &closed, SECRET_KEY), "s3://backups");
    let unreachable_member = backup(
        &[
            "--endpoint",
            &closed,
            "--to",
            &format!("file://{}", root.path().join("d").display()),
            "--name",
            "x",
        ],
        SECRET_KEY,
    );
    failed(unreachable_member, &format!("connecting to {closed}"));
    failed(backup(&["--endpoint", &follower, "--to", "ftp://x", "--name", "x"], SECRET_KEY), "neither s3://");

    // s3s-fs keeps its own bookkeeping in dot files; an object is any other file.
    let visible =
        |p: &std::path::PathBuf| p.file_name().is_some_and(|n| !n.to_string_lossy().starts_with('.'));
    let left: Vec<_> = walk(root.path()).into_iter().filter(|p| p.is_file() && visible(p)).collect();
    assert!(left.is_empty(), "something was stored: {left:?}");
}

/// The names in `dir`, sorted.
fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("the directory")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        }
        found.push(path);
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_after_each_backup_keeps_the_newest_and_deletes_the_rest_whole() {
    let (_cluster, follower) = cluster_with_data().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let to = format!("file://{}", dir.path().display());
    let mut pruned = Vec::new();
    for name in ["n1", "n2", "n3", "n4"] {
        let args = ["--endpoint", &follower, "--to", &to, "--name", name, "--retain-count", "2"];
        pruned.extend(report(backup(&args, SECRET_KEY)).pruned);
    }
    assert_eq!(pruned, ["n1", "n2"]);
    let names = file_names(dir.path());
    assert_eq!(names, ["n3.json", "n3.snapshot", "n4.json", "n4.snapshot"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_counts_only_the_backups_of_the_same_cluster() {
    let (one, two) = (TestCluster::start(1), TestCluster::start(1));
    one.leader().await;
    two.leader().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let to = format!("file://{}", dir.path().display());
    for (cluster, name) in [(&one, "one-1"), (&two, "two-1"), (&one, "one-2"), (&two, "two-2")] {
        let endpoint = cluster.members[0].client_url();
        ok(backup(
            &["--endpoint", &endpoint, "--to", &to, "--name", name, "--retain-count", "1"],
            SECRET_KEY,
        ));
    }
    let names = file_names(dir.path());
    assert_eq!(names, ["one-2.json", "one-2.snapshot", "two-2.json", "two-2.snapshot"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_backup_is_restored_into_a_scratch_member_that_hashes_as_the_cluster_did() {
    let (_cluster, follower) = cluster_with_data().await;
    let (root, s3) = s3::with_bucket("backups").await;
    let args = [
        "--endpoint",
        &follower,
        "--to",
        "s3://backups/v",
        "--name",
        "v1",
        "--s3-endpoint",
        &s3,
        "--s3-path-style",
    ];
    let verified = manifest(backup(&[&args[..], &["--verify"]].concat(), SECRET_KEY));
    assert_eq!((verified.verified, verified.verification.as_deref()), (Some(true), None));
    // The verdict is in the manifest stored beside it, where retention reads it.
    let stored: Manifest =
        serde_json::from_slice(&std::fs::read(root.path().join("backups/v/v1.json")).expect("the manifest"))
            .expect("a manifest");
    assert_eq!(stored.verified, Some(true));
    // No scratch member is left running, and no scratch directory behind.
    let scratch = std::env::temp_dir();
    let left: Vec<_> = std::fs::read_dir(&scratch)
        .expect("the temp dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("verify-v1-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// `consensus-node verify` of the backup `name` in `dir`.
fn verify(dir: &Path, name: &str) -> Output {
    consensus_node(&["verify", "--from", &format!("file://{}", dir.display()), "--name", name])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_changed_after_it_was_written_fails_verification_and_says_so_in_its_manifest() {
    let (_cluster, follower) = cluster_with_data().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let to = format!("file://{}", dir.path().display());
    ok(backup(&["--endpoint", &follower, "--to", &to, "--name", "n1"], SECRET_KEY));
    let object = dir.path().join("n1.snapshot");
    let original = std::fs::read(&object).expect("the object");
    let stored = |dir: &Path| -> Manifest {
        serde_json::from_slice(&std::fs::read(dir.join("n1.json")).expect("the manifest"))
            .expect("a manifest")
    };
    ok(verify(dir.path(), "n1"));
    assert_eq!(stored(dir.path()).verified, Some(true));

    // One byte flipped on the disk it sits on: caught by its sha256.
    let mut flipped = original.clone();
    flipped[original.len() / 2] ^= 0x40;
    std::fs::write(&object, &flipped).expect("the flip");
    let failed = verify(dir.path(), "n1");
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("sha256") && stderr.contains("changed since it was written"), "{stderr}");
    assert_eq!(stored(dir.path()).verified, Some(false));

    // Intact bytes but a manifest whose HashKV the data does not have: caught by the
    // restored member.
    std::fs::write(&object, &original).expect("the original back");
    let mut wrong = stored(dir.path());
    wrong.hash_kv = wrong.hash_kv.wrapping_add(1);
    std::fs::write(dir.path().join("n1.json"), serde_json::to_vec(&wrong).expect("json"))
        .expect("the manifest");
    let failed = verify(dir.path(), "n1");
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("restored, it hashes to"), "{stderr}");
    let verdict = stored(dir.path());
    assert_eq!(verdict.verified, Some(false));
    assert!(verdict.verification.is_some_and(|why| why.contains("the cluster reported")));
}

/// `consensus-node fetch` with `args`, the test's S3 credentials in its environment.
fn fetch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_consensus-node"))
        .arg("fetch")
        .args(args)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("consensus-node runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_backup_is_fetched_whole_and_checked_before_a_restore() {
    let (_cluster, follower) = cluster_with_data().await;
    let (root, s3) = s3::with_bucket("backups").await;
    let store = ["--s3-endpoint", &s3, "--s3-path-style"];
    let args = ["--endpoint", &follower, "--to", "s3://backups/prod/demo", "--name", "demo-1"];
    let taken = manifest(backup(&[&args[..], &store[..]].concat(), SECRET_KEY));
    let dir = tempfile::tempdir().expect("tempdir");
    // Into a directory not made yet, as a recovery's on a member's volume.
    let to = dir.path().join("replaced").join("demo-1.snapshot");
    let to_arg = to.display().to_string();
    let from = ["--from", "s3://backups/prod/demo", "--name", "demo-1", "--to", &to_arg];

    let fetched: Manifest =
        serde_json::from_str(ok(fetch(&[&from[..], &store[..]].concat())).trim()).expect("the manifest");
    assert_eq!(fetched, taken);
    assert_stored_as_the_manifest_says(&to, &taken);
    assert_eq!(restored_keys(&to).await.len(), 101, "the fetched snapshot restores every key");

    // A stored object that changed since it was written is refused, and nothing is left.
    std::fs::remove_file(&to).expect("removing the fetched file");
    let object = root.path().join("backups/prod/demo/demo-1.snapshot");
    let mut bytes = std::fs::read(&object).expect("the object");
    bytes[100] ^= 0xff;
    std::fs::write(&object, bytes).expect("corrupting it");
    let refused = fetch(&[&from[..], &store[..]].concat());
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("it changed since it was written"), "{said}");
    let parent = to.parent().expect("a directory");
    assert_eq!(file_names(parent), Vec::<String>::new(), "no partial snapshot left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_verified_backup_is_fetched_when_none_is_named() {
    let (cluster, follower) = cluster_with_data().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let stored_in = format!("file://{}", dir.path().join("backups").display());
    let take = |name: &str, extra: &[&str]| {
        let args = ["--endpoint", &follower, "--to", &stored_in, "--name", name];
        manifest(backup(&[&args[..], extra].concat(), SECRET_KEY))
    };
    let verified = take("older-verified", &["--verify"]);
    assert_eq!(verified.verified, Some(true));
    ok(cluster.etcdctl(&cluster.endpoints(), &["put", "/after", "x"]));
    // Manifests give their time to the second: the next backup is taken in a later one.
    let taken: jiff::Timestamp = verified.taken.parse().expect("a time");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while jiff::Timestamp::now().as_second() <= taken.as_second() {
        assert!(std::time::Instant::now() < deadline, "the clock stands still");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Newer, but never verified: not what a new cluster is made from.
    let unverified = take("newer-unverified", &[]);
    assert!(unverified.taken > verified.taken, "{} after {}", unverified.taken, verified.taken);
    let to = dir.path().join("fetched").join("source.snapshot");
    let newest = ["--from", &stored_in, "--newest", "--to", &to.display().to_string()];

    let fetched: Manifest = serde_json::from_str(ok(fetch(&newest)).trim()).expect("the manifest");
    assert_eq!(fetched.name, "older-verified");
    assert_stored_as_the_manifest_says(&to, &verified);
    assert_eq!(restored_keys(&to).await.len(), 101, "every key of the backup, nothing after");

    // A verified manifest whose object is gone (a prune interrupted between the two) is
    // passed over for the next, and with no verified backup left nothing is fetched, and it
    // says why.
    std::fs::remove_file(&to).expect("removing the fetched file");
    let mut newer = verified.clone();
    (newer.name, newer.taken) = ("pruned-half-way".to_owned(), unverified.taken.clone());
    let manifest_of = |name: &str| dir.path().join("backups").join(format!("{name}.json"));
    std::fs::write(manifest_of("pruned-half-way"), serde_json::to_vec(&newer).expect("json"))
        .expect("a manifest");
    let fetched: Manifest = serde_json::from_str(ok(fetch(&newest)).trim()).expect("the manifest");
    assert_eq!(fetched.name, "older-verified");
    std::fs::remove_file(&to).expect("removing the fetched file");
    std::fs::remove_file(manifest_of("older-verified")).expect("its manifest");
    let refused = fetch(&newest);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("no verified backup in"), "{said}");
    assert!(!to.exists());
    // A name and --newest together are refused before anything is read.
    let both = fetch(&[&newest[..], &["--name", "older-verified"]].concat());
    assert!(!both.status.success());
}
