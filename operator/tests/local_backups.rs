//! Scheduled backups on the local platform, end to end: the real operator takes them with
//! real `consensus-node backup` processes into a volume's directory, says so in status and
//! events, and the backup restores into a new cluster with every key up to its revision. A
//! destination that cannot be reached fails the backup with its cause, is tried again, and
//! leaves the cluster serving.

mod local_support;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};

use consensus_crds::{ConsensusClusterStatus, condition};
use local_support::{Local, kill, wait_until};

/// Backed up every minute, suspended to begin with, into the claim `keep`
/// (`<state-dir>/volumes/keep/` locally).
const CLUSTER: &str = r#"apiVersion: consensus.dev/v1alpha1
kind: ConsensusCluster
metadata:
  name: demo
spec:
  replicas: 3
  backup:
    schedule: "* * * * *"
    suspend: true
    destination:
      volume:
        claimName: keep
    retention:
      maxCount: 2
"#;

const KEYS: usize = 200;

fn backup_condition(status: &ConsensusClusterStatus) -> Option<(String, String, String)> {
    let c = status.conditions.iter().find(|c| c.type_ == condition::BACKUP_SUCCEEDED)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn context(local: &Local) -> String {
    format!("status: {:#?}\nevents:\n{}\nlog:\n{}", local.status(), local.events().join("\n"), local.log())
}

/// `KEYS` puts through etcd's own Rust client; the revision of the last.
fn write_keys(endpoints: Vec<String>) -> i64 {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect(endpoints, None).await.expect("connecting");
        let mut revision = 0;
        for i in 0..KEYS {
            let put = client.put(format!("/kept/{i:04}"), format!("value-{i}"), None).await.expect("a put");
            revision = put.header().expect("a header").revision();
        }
        revision
    })
}

fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0)).expect("a port").local_addr().expect("its address").port()
}

/// The keys under `/kept/` of a new one-member cluster restored from `snapshot`.
fn restored_keys(local: &Local, snapshot: &Path) -> Vec<String> {
    let (client, peer, metrics) = (free_port(), free_port(), free_port());
    let url = |port: u16| format!("http://127.0.0.1:{port}");
    let data = local.dir.path().join("restored");
    let cluster = format!("restored-0={}", url(peer));
    let restore = Command::new(&local.node_bin)
        .args(["restore", "--snapshot"])
        .arg(snapshot)
        .arg("--data-dir")
        .arg(&data)
        .args(["--name", "restored-0", "--initial-cluster", &cluster, "--initial-cluster-token", "restored"])
        .args(["--initial-advertise-peer-urls", &url(peer)])
        .output()
        .expect("running consensus-node restore");
    assert!(restore.status.success(), "restore failed: {}", String::from_utf8_lossy(&restore.stderr));
    let mut member = Command::new(&local.node_bin)
        .args(["run", "--name", "restored-0"])
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen-client-urls", &url(client), "--advertise-client-urls", &url(client)])
        .args(["--listen-peer-urls", &url(peer), "--initial-advertise-peer-urls", &url(peer)])
        .args(["--listen-metrics-urls", &url(metrics), "--initial-cluster", &cluster])
        .args(["--initial-cluster-token", "restored", "--initial-cluster-state", "new"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the restored member");
    let endpoint = url(client);
    let keys = wait_until("the restored member to serve", String::new, || {
        let output = Command::new("etcdctl")
            .args([
                "--endpoints",
                &endpoint,
                "--command-timeout=2s",
                "get",
                "/kept/",
                "--prefix",
                "--keys-only",
            ])
            .env("ETCDCTL_API", "3")
            .output()
            .ok()?;
        output.status.success().then(|| {
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect()
        })
    });
    kill(member.id(), libc::SIGKILL);
    let _ = member.wait();
    keys
}

#[test]
fn a_resumed_schedule_backs_up_at_once_and_the_backup_restores_every_key() {
    let mut local = Local::declaring(CLUSTER);
    local.start(None);
    let status = local.wait_for_voters(3);
    // Suspended: said so, and nothing promised.
    let (_, reason, _) = backup_condition(&status).expect("BackupSucceeded");
    assert_eq!(reason, "Suspended");
    assert_eq!(status.next_backup, None);
    assert!(status.last_backup.is_none());

    let revision = write_keys(local.recorded().into_values().collect());
    // Resumed: the newest slot is taken at once, not at the next minute.
    local.edit(|line| (line.trim() == "suspend: true").then(|| "    suspend: false".to_owned()));
    let (status, record) = wait_until(
        "a backup in status",
        || context(&local),
        || {
            let status = local.status()?;
            let record = status.last_backup.clone()?;
            Some((status, record))
        },
    );
    let (value, reason, message) = backup_condition(&status).expect("BackupSucceeded");
    assert_eq!((value.as_str(), reason.as_str()), ("True", "BackupTaken"), "{message}");
    assert!(record.revision >= revision, "backup at {} before the last put at {revision}", record.revision);
    assert_eq!(record.verified, Some(true), "restored into a scratch member and hashed as the cluster did");
    assert!(status.next_backup.is_some() && status.last_scheduled_backup.is_some());
    let events = local.events();
    for expected in ["BackupStarted", "BackupSucceeded"] {
        let told = |e: &String| e.contains(&format!(" {expected} ")) && e.contains(&record.name);
        assert!(events.iter().any(told), "{events:#?}");
    }

    // On disk where the claim is, as the record says: the snapshot and its manifest.
    let keep = local.state().join("volumes").join("keep");
    let snapshot = keep.join(format!("{}.snapshot", record.name));
    assert_eq!(record.location, format!("file://{}", snapshot.display()));
    let sha256 = Command::new("sha256sum").arg(&snapshot).output().expect("sha256sum");
    assert!(String::from_utf8_lossy(&sha256.stdout).starts_with(&record.sha256), "{record:?}");
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(keep.join(format!("{}.json", record.name))).expect("the manifest"),
    )
    .expect("a JSON manifest");
    assert_eq!(manifest["revision"].as_i64(), Some(record.revision));
    assert_eq!(manifest["clusterId"].as_str(), status.cluster_id.as_deref());

    let keys = restored_keys(&local, &snapshot);
    assert_eq!(keys.len(), KEYS, "every key written before the backup's revision");

    // An operator killed and started again keeps the schedule: once the new run has found
    // the cluster steady (it would have started a backup instead), the slot was not taken
    // twice.
    local.kill_operator_only();
    let runs_before = local.log().matches("local mode").count();
    local.start(None);
    wait_until(
        "the restarted operator to find the cluster steady",
        || context(&local),
        || {
            let log = local.log();
            let this_run = log.rsplit("local mode").next()?;
            (log.matches("local mode").count() > runs_before && this_run.contains("steady:")).then_some(())
        },
    );
    let after = local.status().expect("a status");
    assert!(after.last_scheduled_backup >= status.last_scheduled_backup);
    // `<time> BackupStarted <backup> attempt=<n> from=<member>`: each try of each slot once.
    let started: Vec<String> = local.events().into_iter().filter(|e| e.contains(" BackupStarted ")).collect();
    let tries: std::collections::BTreeSet<(&str, &str)> = started
        .iter()
        .filter_map(|e| {
            let mut words = e.split_whitespace().skip(2);
            Some((words.next()?, words.next()?))
        })
        .collect();
    assert_eq!(tries.len(), started.len(), "a slot started twice: {started:#?}");
}

#[test]
fn an_unreachable_store_fails_the_backup_with_its_cause_and_it_is_tried_again() {
    // Nothing listens on this port.
    let port = free_port();
    let cluster = CLUSTER.replace("    suspend: true\n", "").replace(
        "      volume:\n        claimName: keep\n",
        &format!(
            "      s3:\n        bucket: missing\n        endpoint: http://127.0.0.1:{port}\n        forcePathStyle: true\n        credentialsSecret:\n          name: unused\n"
        ),
    );
    let mut local = Local::declaring(&cluster);
    // Locally the credentials come from the operator's environment.
    local.env =
        ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"].map(|k| (k.to_owned(), "test".to_owned())).into();
    local.start(None);
    let failed = wait_until(
        "a failed backup tried again",
        || context(&local),
        || {
            let status = local.status()?;
            let (_, reason, message) = backup_condition(&status)?;
            (reason == "BackupFailed"
                && local.events().iter().filter(|e| e.contains(" BackupStarted ")).count() >= 2)
                .then_some((status, message))
        },
    );
    let (status, message) = failed;
    assert!(message.contains(&format!("127.0.0.1:{port}")), "names the store: {message}");
    assert!(message.contains("tried again at"), "{message}");
    assert!(local.events().iter().any(|e| e.contains(" BackupFailed ")), "{:#?}", local.events());
    // The cluster is untouched: still serving, as declared.
    let available = status.conditions.iter().find(|c| c.type_ == condition::AVAILABLE).expect("Available");
    assert_eq!(available.status, "True");
    assert!(status.last_backup.is_none());
}

/// `consensus-operator backup ARGS` against the local cluster in `local`: its exit, what it
/// printed and what it logged.
fn ask_for_backup(local: &Local, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_consensus-operator"))
        .args(["backup", "--cluster", "demo", "--state-dir"])
        .arg(local.state())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running consensus-operator backup");
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (output.status.success(), text(&output.stdout), text(&output.stderr))
}

#[test]
fn a_backup_asked_for_now_is_taken_verified_and_restores_every_key() {
    // No schedule and no destination of its own: a request must name one.
    let mut local = Local::declaring(
        "apiVersion: consensus.dev/v1alpha1\nkind: ConsensusCluster\nmetadata:\n  name: demo\nspec:\n  replicas: 3\n",
    );
    local.start(None);
    local.wait_for_voters(3);
    let revision = write_keys(local.recorded().into_values().collect());

    let (ok, _, said) = ask_for_backup(&local, &["--name", "nowhere", "--timeout", "2m"]);
    assert!(!ok, "{said}");
    assert!(said.contains("backup nowhere failed: no destination"), "{said}\n{}", context(&local));

    let (ok, printed, said) =
        ask_for_backup(&local, &["--name", "before-upgrade", "--claim", "ondemand", "--timeout", "5m"]);
    assert!(ok, "{said}\n{}", context(&local));
    assert!(said.contains("Running: being taken from demo-"), "{said}");
    let name = printed.split_whitespace().next().expect("the backup's name").to_owned();
    assert!(name.starts_with("demo-") && name.ends_with("-before-upgrade"), "{printed}");
    assert!(printed.contains(", verified)"), "{printed}");
    let status: consensus_crds::ConsensusBackupStatus = serde_json::from_str(
        &std::fs::read_to_string(local.state().join("demo.backups/requests/before-upgrade.status.json"))
            .expect("the request's status"),
    )
    .expect("a status");
    let record = status.backup.expect("the backup");
    assert!(record.revision >= revision, "backup at {} before the last put at {revision}", record.revision);
    let snapshot = local.state().join("volumes/ondemand").join(format!("{name}.snapshot"));
    assert_eq!(record.location, format!("file://{}", snapshot.display()));
    assert!(
        local.events().iter().any(|e| e.contains(" BackupSucceeded request before-upgrade")),
        "{:#?}",
        local.events()
    );
    assert_eq!(restored_keys(&local, &snapshot).len(), KEYS, "every key written before its revision");
    // The cluster's schedule is untouched; its newest backup is this one.
    let cluster = local.status().expect("a status");
    assert_eq!(cluster.last_scheduled_backup, None);
    assert_eq!(cluster.last_backup.map(|b| b.name), Some(name));

    // A request is asked for once.
    let (ok, _, said) = ask_for_backup(&local, &["--name", "before-upgrade", "--claim", "ondemand"]);
    assert!(!ok && said.contains("exists already"), "{said}");
}
