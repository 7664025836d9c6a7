//! A quorum loss on the local platform, with real member processes: two of three members
//! paused (SIGSTOP: alive, so nobody restarts them, but silent) lose the quorum, which
//! status and a Warning event say at once; resumed within the timeout, the cluster is
//! Running again, nothing recovered, and an event says how long it was without. Members
//! killed with their data wiped: recovered from the survivor, or from the newest backup.

mod local_support;

use consensus_crds::{BackupRecord, ConsensusClusterStatus, Phase, condition};
use local_support::{Local, kill, wait_until};

#[test]
fn a_quorum_lost_to_paused_members_is_told_at_once_and_so_is_its_end() {
    // Recovered automatically, but only after ten minutes: a shorter outage changes nothing.
    let mut local = Local::declaring(&RECOVERING.replace("quorumLossTimeout: 5s", "quorumLossTimeout: 10m"));
    local.start(None);
    let before = local.wait_for_voters(3);
    let paused: Vec<u32> =
        ["demo-1", "demo-2"].iter().map(|name| local.member_pid(name).expect("a member pid")).collect();
    for pid in &paused {
        kill(*pid, libc::SIGSTOP);
    }
    let status = wait_until(
        "the quorum loss in status",
        || context(&local),
        || local.status().filter(|s| s.phase == Some(Phase::QuorumLost)),
    );
    let lost = status.conditions.iter().find(|c| c.type_ == condition::QUORUM_LOST).expect("QuorumLost");
    assert_eq!((lost.status.as_str(), lost.reason.as_str()), ("True", "NotEnoughHealthyVoters"), "{lost:?}");
    let told = |reason: &str| local.events().iter().filter(|e| e.contains(&format!(" {reason} "))).count();
    wait_until("a QuorumLost event", || context(&local), || (told("QuorumLost") == 1).then_some(()));

    for pid in &paused {
        kill(*pid, libc::SIGCONT);
    }
    local.wait_for_voters(3);
    wait_until("a QuorumRegained event", || context(&local), || (told("QuorumRegained") == 1).then_some(()));
    assert_eq!(told("QuorumLost"), 1, "told once: {}", context(&local));
    let regained = local.events().into_iter().find(|e| e.contains(" QuorumRegained ")).expect("the event");
    assert!(
        regained.contains(&format!("after it was lost at {}", lost.last_transition_time.0)),
        "{regained}"
    );
    let after = local.status().expect("a status");
    assert_eq!((after.cluster_id, after.last_recovery), (before.cluster_id, None), "nothing recovered");
}

const RECOVERING: &str = r#"apiVersion: consensus.dev/v1alpha1
kind: ConsensusCluster
metadata:
  name: demo
spec:
  replicas: 3
  recovery:
    autoRestore: true
    quorumLossTimeout: 5s
"#;

const KEYS: usize = 100;

/// `KEYS` puts through etcd's own Rust client.
fn write_keys(endpoints: Vec<String>) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect(endpoints, None).await.expect("connecting");
        for i in 0..KEYS {
            client.put(format!("/kept/{i:03}"), format!("value-{i}"), None).await.expect("a put");
        }
    });
}

/// How many keys under `/kept/` a linearizable read through etcd's own client finds.
fn kept_keys(endpoints: Vec<String>) -> Option<usize> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect(endpoints, None).await.ok()?;
        let options = etcd_client::GetOptions::new().with_prefix().with_count_only();
        let found = client.get("/kept/", Some(options)).await.ok()?;
        usize::try_from(found.count()).ok()
    })
}

/// What a failed wait shows: the status, the events and the operator's log.
fn context(local: &Local) -> String {
    format!("status: {:#?}\nevents:\n{}\nlog:\n{}", local.status(), local.events().join("\n"), local.log())
}

/// Member `name` gone with its disk: killed, its data directory deleted.
fn lose(local: &Local, name: &str) {
    kill(local.member_pid(name).expect("a member pid"), libc::SIGKILL);
    std::fs::remove_dir_all(local.state().join("demo").join(name)).expect("wiping its data");
}

#[test]
fn two_members_lost_with_their_data_come_back_from_the_survivor_with_every_write() {
    let mut local = Local::declaring(RECOVERING);
    local.start(None);
    let before = local.wait_for_voters(3);
    write_keys(local.recorded().into_values().collect());

    // Two members gone, and their disks with them.
    for name in ["demo-1", "demo-2"] {
        lose(&local, name);
    }
    let status = wait_until(
        "a finished recovery",
        || context(&local),
        || local.status().filter(|s| s.last_recovery.is_some()),
    );
    let recovery = status.last_recovery.clone().expect("a recovery");
    assert_eq!(
        (recovery.source, recovery.from.as_str()),
        (consensus_crds::RecoverySource::Survivor, "demo-0")
    );
    assert_eq!(recovery.previous_cluster_id, before.cluster_id);
    assert_ne!(status.cluster_id, before.cluster_id, "a new cluster id");
    assert!(recovery.finished.is_some() && status.recovery.is_none());
    let back = local.wait_for_voters(3);
    let names: Vec<&str> = back.members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["demo-0", "demo-1", "demo-2"], "members keep their names");
    let found = wait_until(
        "every key readable",
        || context(&local),
        || kept_keys(local.recorded().into_values().collect()).filter(|n| *n == KEYS),
    );
    assert_eq!(found, KEYS, "nothing the survivor applied is lost");
    let events = local.events();
    for reason in ["QuorumLost", "RecoveryStarted", "Recovered"] {
        assert!(events.iter().any(|e| e.contains(&format!(" {reason} "))), "no {reason}: {events:#?}");
    }
}

#[test]
fn a_cluster_whose_every_member_lost_its_data_comes_back_from_its_newest_backup() {
    recovers_from_its_newest_backup("      volume:\n        claimName: keep\n", &[]);
}

#[test]
fn a_cluster_backed_up_to_s3_comes_back_from_there() {
    let (_s3, destination) = S3::start();
    recovers_from_its_newest_backup(&destination, &S3::CREDENTIALS);
}

/// A real S3 server (s3s-fs) for as long as it lives, with the bucket `backups`; the
/// operator's own environment holds the credentials locally.
struct S3 {
    _root: tempfile::TempDir,
    _runtime: tokio::runtime::Runtime,
}

impl S3 {
    const CREDENTIALS: [(&str, &str); 2] = [
        ("AWS_ACCESS_KEY_ID", consensus_e2e::s3::ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", consensus_e2e::s3::SECRET_KEY),
    ];

    /// The server, and the YAML under `destination:` that names it.
    fn start() -> (Self, String) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let (root, endpoint) = runtime.block_on(consensus_e2e::s3::with_bucket("backups"));
        let destination = format!(
            "      s3:\n        bucket: backups\n        endpoint: {endpoint}\n        forcePathStyle: true\n        \
             credentialsSecret:\n          name: unused-locally\n"
        );
        (Self { _root: root, _runtime: runtime }, destination)
    }
}

/// `RECOVERING` backed up to `destination` (the YAML under `destination:`) every minute once
/// resumed.
fn backed_up(destination: &str) -> String {
    RECOVERING.replace(
        "  recovery:\n",
        &format!("  backup:\n    schedule: \"* * * * *\"\n    suspend: true\n    destination:\n{destination}  recovery:\n"),
    )
}

/// `spec` running with `KEYS` written and then backed up (the schedule resumed), with `env`:
/// the cluster, its status before, and the verified backup.
fn running_and_backed_up(spec: &str, env: &[(&str, &str)]) -> (Local, ConsensusClusterStatus, BackupRecord) {
    let mut local = Local::declaring(spec);
    local.env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    local.start(None);
    let before = local.wait_for_voters(3);
    write_keys(local.recorded().into_values().collect());
    local.edit(|line| (line.trim() == "suspend: true").then(|| "    suspend: false".to_owned()));
    let backup = wait_until(
        "a verified backup",
        || context(&local),
        || local.status()?.last_backup.filter(|b| b.verified == Some(true)),
    );
    (local, before, backup)
}

/// Backed up to `destination` (the YAML under `destination:`), then every member lost with
/// its data: the cluster comes back from the backup with every key up to its revision.
fn recovers_from_its_newest_backup(destination: &str, env: &[(&str, &str)]) {
    // A backup of every key, then all three members and their disks gone.
    let (local, before, backup) = running_and_backed_up(&backed_up(destination), env);
    for name in ["demo-0", "demo-1", "demo-2"] {
        lose(&local, name);
    }
    let status = wait_until(
        "a finished recovery",
        || context(&local),
        || local.status().filter(|s| s.last_recovery.is_some()),
    );
    let recovery = status.last_recovery.clone().expect("a recovery");
    assert_eq!(recovery.source, consensus_crds::RecoverySource::Backup);
    // The schedule goes on every minute until the members are gone, so the newest backup may
    // be a later one than the first verified (CI: 00:04:00 after 00:03:00).
    let newest = status.last_backup.clone().expect("the newest backup");
    assert!(newest.time >= backup.time, "{newest:?} is older than {backup:?}");
    assert_eq!(recovery.from, newest.location);
    assert!(recovery.lost_writes.contains(&format!("after revision {}", newest.revision)), "{recovery:?}");
    assert_ne!(status.cluster_id, before.cluster_id, "a new cluster id");
    local.wait_for_voters(3);
    let found = wait_until(
        "every key readable",
        || context(&local),
        || kept_keys(local.recorded().into_values().collect()).filter(|n| *n == KEYS),
    );
    assert_eq!(found, KEYS, "every write up to the backup's revision");
}

#[test]
fn five_members_losing_three_wait_for_a_person_and_the_documented_request_heals_them() {
    let five =
        RECOVERING.replace("replicas: 3", "replicas: 5").replace("autoRestore: true", "autoRestore: false");
    let mut local = Local::declaring(&five);
    local.start(None);
    let before = local.wait_for_voters(5);
    write_keys(local.recorded().into_values().collect());
    for name in ["demo-2", "demo-3", "demo-4"] {
        lose(&local, name);
    }
    // Lost, and left as it is: the condition says how to ask for a recovery.
    let message = wait_until(
        "the condition to say how to recover",
        || context(&local),
        || {
            let status = local.status()?;
            let lost =
                status.conditions.iter().find(|c| c.type_ == condition::QUORUM_LOST && c.status == "True")?;
            lost.message
                .contains("annotate the cluster with consensus.dev/recover=")
                .then(|| lost.message.clone())
        },
    );
    assert!(message.contains("autoRestore is off"), "{message}");
    assert_eq!(local.status().and_then(|s| s.last_recovery), None);

    // The request, as the README shows it: the time now.
    let now = k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    local.edit(|line| {
        (line == "  name: demo")
            .then(|| format!("  name: demo\n  annotations:\n    consensus.dev/recover: \"{now}\""))
    });
    let status = wait_until(
        "a finished recovery",
        || context(&local),
        || local.status().filter(|s| s.last_recovery.is_some()),
    );
    let recovery = status.last_recovery.expect("a recovery");
    assert_eq!(recovery.source, consensus_crds::RecoverySource::Survivor);
    assert!(["demo-0", "demo-1"].contains(&recovery.from.as_str()), "{recovery:?}");
    assert!(recovery.requested.is_some(), "{recovery:?}");
    assert_ne!(status.cluster_id, before.cluster_id);
    local.wait_for_voters(5);
    let found = wait_until(
        "every key readable",
        || context(&local),
        || kept_keys(local.recorded().into_values().collect()).filter(|n| *n == KEYS),
    );
    assert_eq!(found, KEYS);
}

#[test]
fn an_operator_killed_at_each_part_of_a_recovery_is_finished_by_the_next() {
    let mut local = Local::declaring(RECOVERING);
    local.start(None);
    let before = local.wait_for_voters(3);
    write_keys(local.recorded().into_values().collect());
    // The quorum lost while no operator runs (nothing restarts the members).
    local.kill_operator_only();
    for name in ["demo-1", "demo-2"] {
        lose(&local, name);
    }
    // Each run dies at the next part; the one after picks the recovery up where it stopped.
    for fault in ["BeginRecovery", "RecoverSnapshot", "RecoverReplace", "RecoverRestore"] {
        let died_before = local.log().matches("exiting right after this point").count();
        local.start(Some(fault));
        let log_path = local.dir.path().join("operator.log");
        let log_tail = || std::fs::read_to_string(&log_path).unwrap_or_default();
        let code = wait_until(&format!("the operator to die after {fault}"), log_tail, || local.exited());
        assert_eq!(code, Some(consensus_operator::fault::FAULT_EXIT), "{}", context(&local));
        let log = local.log();
        assert_eq!(log.matches("exiting right after this point").count(), died_before + 1);
        assert!(log.rsplit("local mode").next().is_some_and(|run| run.contains(fault)), "{log}");
    }
    local.start(None);
    let status = wait_until(
        "a finished recovery",
        || context(&local),
        || local.status().filter(|s| s.last_recovery.is_some()),
    );
    assert_ne!(status.cluster_id, before.cluster_id);
    // The old data kept aside, and the restore the crash interrupted beside it.
    let token = status.last_recovery.expect("a recovery").cluster_token;
    let replaced = local.state().join("demo.recovery").join(token).join("replaced");
    assert!(replaced.join("demo-0").is_dir() && replaced.join("demo-0.1").is_dir(), "{}", replaced.display());
    local.wait_for_voters(3);
    let found = wait_until(
        "every key readable",
        || context(&local),
        || kept_keys(local.recorded().into_values().collect()).filter(|n| *n == KEYS),
    );
    assert_eq!(found, KEYS, "nothing the survivor applied is lost, whatever the crashes");
    let started = local.events().iter().filter(|e| e.contains(" RecoveryStarted ")).count();
    assert_eq!(started, 1, "one recovery, resumed: {}", context(&local));
}

#[test]
fn a_new_cluster_named_like_a_deleted_one_is_made_from_its_newest_verified_backup() {
    let (_s3, destination) = S3::start();
    let spec = backed_up(&destination);
    let (mut old, before, backup) = running_and_backed_up(&spec, &S3::CREDENTIALS);
    // The cluster and the machine it ran on are gone; its backups are not.
    old.kill_all();
    drop(old);

    // A cluster of the same name elsewhere, from the newest verified backup in the place.
    let mut new =
        Local::declaring(&spec.replace("  recovery:\n", "  bootstrap:\n    fromBackup: {}\n  recovery:\n"));
    new.env = S3::CREDENTIALS.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    new.start(None);
    let status = wait_until(
        "the cluster made from the backup",
        || context(&new),
        || new.status().filter(|s| s.last_recovery.is_some()),
    );
    let made = status.last_recovery.clone().expect("a record");
    assert_eq!(made.source, consensus_crds::RecoverySource::Backup);
    assert!(made.quorum_lost.is_none() && made.previous_cluster_id.is_none(), "{made:?}");
    assert!(backup.location.starts_with(&made.from), "{} in {}", backup.location, made.from);
    assert_ne!(status.cluster_id, before.cluster_id, "a new cluster id");
    let back = new.wait_for_voters(3);
    let names: Vec<&str> = back.members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["demo-0", "demo-1", "demo-2"]);
    let found = wait_until(
        "every key readable",
        || context(&new),
        || kept_keys(new.recorded().into_values().collect()).filter(|n| *n == KEYS),
    );
    assert_eq!(found, KEYS, "every write of the backup");
    let events = new.events();
    assert!(
        events.iter().any(|e| e.contains(" RecoveryStarted ") && e.contains("newest verified backup")),
        "{events:#?}"
    );
    assert!(
        events.iter().any(|e| e.contains(" Recovered made from the newest verified backup")),
        "{events:#?}"
    );
    assert!(
        !events.iter().any(|e| e.contains(" QuorumLost ")),
        "a cluster that never ran lost nothing: {events:#?}"
    );
}
