//! Issue 6 on the local platform, with real `consensus-node` processes: 3 -> 5 -> 3 under
//! a write load, crash injection after each step, a member that lost its data, and a new
//! member that never starts. The scenarios run one at a time (two cores are enough for one
//! cluster under load, not for four).

mod local_support;

use std::sync::Mutex;

use consensus_crds::MemberRole;
use consensus_e2e::load::{Sampler, Writer};
use consensus_operator::fault::FAULT_EXIT;
use consensus_operator::membership::MemberOps;
use local_support::{Local, kill, wait_until};

static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// The three members that stay in every scenario, the ones the load and sampler talk to.
fn original_endpoints(local: &Local) -> Vec<String> {
    let recorded = local.recorded();
    (0..3).filter_map(|i| recorded.get(&format!("demo-{i}")).cloned()).collect()
}

fn started(runtime: &tokio::runtime::Runtime) -> (Local, Writer, Sampler) {
    let mut local = Local::new();
    local.start(None);
    local.wait_for_voters(3);
    let endpoints = original_endpoints(&local);
    let writer = Writer::start(runtime, endpoints.clone());
    let sampler = Sampler::start(runtime, endpoints, std::time::Duration::from_millis(20));
    (local, writer, sampler)
}

#[test]
fn three_to_five_to_three_under_load_never_has_an_even_voter_count() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let runtime = runtime();
    let (local, writer, sampler) = started(&runtime);
    let cluster_id = local.status().and_then(|s| s.cluster_id);

    local.set_replicas(5);
    let five = local.wait_for_voters(5);
    assert_eq!(five.cluster_id, cluster_id);
    local.set_replicas(3);
    let three = local.wait_for_voters(3);
    assert_eq!(three.cluster_id, cluster_id);

    writer.stop();
    let samples = sampler.stop();
    let (acknowledged, missing) = writer.missing(&runtime, original_endpoints(&local));
    let events = local.events();
    eprintln!(
        "3->5->3: {} samples, voters between {} and {}, {} removals seen, {acknowledged} writes acknowledged, \
         {} missing, {} puts failed\nevents:\n{}",
        samples.taken,
        samples.min_voters,
        samples.max_voters,
        samples.removals_seen,
        missing.len(),
        writer.failed.lock().map(|f| *f).unwrap_or(0),
        events.join("\n")
    );
    assert!(samples.taken > 50, "the sampler hardly ran: {samples:?}");
    assert!(samples.even.is_empty(), "even voter counts seen: {:?}", samples.even);
    assert_eq!(samples.max_voters, 5);
    assert_eq!(samples.min_voters, 3);
    assert!(samples.leader_removed.is_empty(), "the leader was removed: {:?}", samples.leader_removed);
    assert_eq!(samples.removals_seen, 2);
    assert_eq!(samples.cluster_ids.len(), 1, "{:?}", samples.cluster_ids);
    assert!(acknowledged > 0);
    assert!(
        missing.is_empty(),
        "{} acknowledged writes missing: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    for event in ["MemberAdded", "LearnerCaughtUp", "VotersChanged", "MemberRemoved", "VolumeDeleted"] {
        assert!(events.iter().any(|e| e.contains(event)), "no {event} event: {events:#?}");
    }
    // The operator's own account agrees: no member it removed was the leader then.
    for removal in events.iter().filter(|e| e.contains(" MemberRemoved ")) {
        let mut words = removal.split_whitespace().skip(2);
        let name = words.next().unwrap_or_default();
        assert!(!removal.contains(&format!("leader={name}")), "{removal}");
    }
    assert!(!local.state().join("demo").join("demo-3").exists(), "the volume of demo-3 is left");
}

/// Scales towards `replicas` with the fault point set; true when the operator died there.
fn scale_with_fault(local: &mut Local, replicas: i32, fault: &str) -> bool {
    local.kill_operator_only();
    local.start(Some(fault));
    local.set_replicas(replicas);
    let (log, events) = (local.dir.path().join("operator.log"), local.state().join("demo.events"));
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    let died = wait_until(
        &format!("the operator to die after {fault} or reach {replicas}"),
        || format!("events:\n{}\nlog:\n{}", read(&events), read(&log)),
        || {
            if let Some(code) = local.exited() {
                return Some(Some(code));
            }
            let s = local.status()?;
            let done = s.members.len() == usize::try_from(replicas).unwrap_or(0)
                && s.members.iter().all(|m| m.healthy && m.role != MemberRole::Learner)
                && s.conditions.iter().any(|c| c.type_ == "Progressing" && c.reason == "Reconciled");
            done.then_some(None)
        },
    );
    if let Some(code) = died {
        let log = local.log();
        // A panic's message comes before its backtrace, which alone fills a short tail.
        let from = log.lines().position(|l| l.contains("panicked")).unwrap_or(0);
        let tail: Vec<&str> = log.lines().skip(from).take(40).collect();
        assert_eq!(
            code,
            Some(FAULT_EXIT),
            "operator exit with fault {fault}; log tail:\n{}",
            tail.join("\n")
        );
        assert!(local.log().contains("exiting right after this point"), "{}", local.log());
        local.start(None);
    }
    local.wait_for_voters(usize::try_from(replicas).unwrap_or(0));
    died.is_some()
}

#[test]
fn the_operator_killed_after_any_step_is_restarted_and_finishes_the_change() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let runtime = runtime();
    let (mut local, writer, sampler) = started(&runtime);
    let mut exercised = Vec::new();
    // Every step of a grow and of a shrink, each once (TransferLeadership only happens
    // when the leader is leaving, arranged below).
    let plan: [(i32, &str); 10] = [
        (5, "AddLearner"),
        (3, "TransferLeadership"),
        (5, "ResizeWorkload"),
        (3, "RemoveMember"),
        (5, "ChangeVoters"),
        (3, "ChangeVoters"),
        (5, "AddLearner"),
        (3, "ResizeWorkload"),
        (5, "ResizeWorkload"),
        (3, "DeleteVolume"),
    ];
    for (replicas, fault) in plan {
        if fault == "TransferLeadership" {
            // Leadership on a member that leaves, so the shrink has to move it.
            let status = local.status().expect("status");
            let to = status
                .members
                .iter()
                .find(|m| m.name == "demo-4")
                .and_then(|m| u64::from_str_radix(&m.id, 16).ok())
                .expect("demo-4's id");
            // MoveLeader is accepted only on the leader.
            let leader =
                status.leader.and_then(|name| local.recorded().remove(&name)).expect("the leader's URL");
            runtime.block_on(async {
                let mut ops = MemberOps::connect(&leader).await.expect("connect");
                ops.move_leader(to).await.expect("move leadership to demo-4");
            });
            wait_until(
                "demo-4 to lead",
                || format!("{:#?}", local.status()),
                || (local.status()?.leader.as_deref() == Some("demo-4")).then_some(()),
            );
        }
        if scale_with_fault(&mut local, replicas, fault) {
            exercised.push(format!("{fault}@{replicas}"));
        }
    }
    writer.stop();
    let samples = sampler.stop();
    let (acknowledged, missing) = writer.missing(&runtime, original_endpoints(&local));
    eprintln!(
        "crash injection: fault points exercised {exercised:?}; {} samples, voters {}..{}, {acknowledged} writes \
         acknowledged, {} missing",
        samples.taken,
        samples.min_voters,
        samples.max_voters,
        missing.len()
    );
    assert_eq!(exercised.len(), plan.len(), "fault points not reached: {exercised:?}");
    assert!(samples.even.is_empty(), "even voter counts seen: {:?}", samples.even);
    assert!(samples.leader_removed.is_empty(), "the leader was removed: {:?}", samples.leader_removed);
    assert_eq!(samples.cluster_ids.len(), 1);
    assert!(missing.is_empty(), "{} acknowledged writes missing", missing.len());
}

#[test]
fn a_member_whose_data_is_wiped_rejoins_as_a_new_member_of_the_same_cluster() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let runtime = runtime();
    let (local, writer, sampler) = started(&runtime);
    let before = local.wait_for_voters(3);
    let victim = before
        .members
        .iter()
        .find(|m| before.leader.as_deref() != Some(m.name.as_str()))
        .expect("a follower");
    let (name, old_id) = (victim.name.clone(), victim.id.clone());

    // Frozen first, so it writes nothing into the directory while it is deleted.
    let pid = local.member_pid(&name).expect("victim pid");
    kill(pid, libc::SIGSTOP);
    std::fs::remove_dir_all(local.state().join("demo").join(&name)).expect("wipe the data directory");
    kill(pid, libc::SIGKILL);

    let after = wait_until(
        &format!("{name} back under a new id"),
        || {
            format!(
                "status: {:#?}\nevents:\n{}\nlog:\n{}",
                local.status(),
                local.events().join("\n"),
                local.log()
            )
        },
        || {
            let s = local.wait_for_voters(3);
            let listed: Vec<_> = s.members.iter().filter(|m| m.name == name).collect();
            (listed.len() == 1 && listed[0].id != old_id).then_some(s)
        },
    );
    writer.stop();
    let samples = sampler.stop();
    let (acknowledged, missing) = writer.missing(&runtime, original_endpoints(&local));
    let new_id = after.members.iter().find(|m| m.name == name).map(|m| m.id.clone()).unwrap_or_default();
    eprintln!(
        "wiped {name}: id {old_id} -> {new_id}; {acknowledged} writes acknowledged, {} missing",
        missing.len()
    );
    assert_eq!(after.cluster_id, before.cluster_id, "the cluster id changed");
    let events = local.events();
    // The new member first, then its vote in place of the old one, then the old id: never
    // two voters while the new one catches up.
    let at = |what: &str| events.iter().position(|e| e.contains(what));
    let (added, swapped, removed) = (
        at(&format!("MemberAdded {name}")),
        at(" VotersChanged "),
        at(&format!("MemberRemoved {name} id={old_id}")),
    );
    assert!(added.is_some() && swapped.is_some() && removed.is_some(), "{events:#?}");
    assert!(added < swapped && swapped < removed, "{events:#?}");
    assert!(samples.taken > 50, "the sampler hardly ran: {samples:?}");
    assert!(samples.min_voters >= 3, "fewer than 3 voters seen: {samples:?}");
    // MemberList lists a voter of either configuration as a voter, so during the one
    // joint step (old voters {a, b, lost}, new {a, b, new}, each of 3, a quorum of each
    // needed) it names four. That is the only even count allowed: no voter configuration
    // is even (the node refuses an even ChangeVoters, and no voter was removed).
    let hex = |id: &str| u64::from_str_radix(id, 16).expect("a hex member id");
    let joint = |ids: &[u64]| ids.len() == 4 && ids.contains(&hex(&old_id)) && ids.contains(&hex(&new_id));
    assert!(
        samples.even.iter().all(|(voters, ids)| *voters == 4 && joint(ids)),
        "even voter counts seen outside the joint step: {:?}",
        samples.even
    );
    assert_eq!(samples.cluster_ids.len(), 1, "{:?}", samples.cluster_ids);
    assert!(missing.is_empty(), "{} acknowledged writes missing", missing.len());
}

#[test]
fn a_new_member_that_never_starts_keeps_the_old_voters_and_scaling_back_cancels_it() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut local = local_support::Local::new();
    // demo-4 cannot start: the node binary is a script that refuses it and runs the
    // real node for everyone else.
    let real = local.node_bin.clone();
    let wrapper = local.dir.path().join("node-but-not-demo-4");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = demo-4 ] && {{ echo 'demo-4 refused by the test' >&2; exit 1; }}; done\nexec '{}' \"$@\"\n",
            real.display()
        ),
    )
    .expect("write the wrapper");
    let executable = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755);
    std::fs::set_permissions(&wrapper, executable).expect("chmod");
    local.node_bin = wrapper;
    local.start(None);
    local.wait_for_voters(3);

    local.set_replicas(5);
    let stuck = wait_until(
        "Progressing False / MemberNotCatchingUp",
        || format!("status: {:#?}\nlog:\n{}", local.status(), local.log()),
        || {
            let s = local.status()?;
            s.conditions
                .iter()
                .any(|c| c.type_ == "Progressing" && c.status == "False" && c.reason == "MemberNotCatchingUp")
                .then_some(s)
        },
    );
    let voters = stuck.members.iter().filter(|m| m.role != MemberRole::Learner).count();
    let degraded = stuck.conditions.iter().find(|c| c.type_ == "Degraded").expect("Degraded");
    eprintln!("stuck: {voters} voters; Degraded {}: {}", degraded.reason, degraded.message);
    assert_eq!(voters, 3, "the voter set changed: {stuck:#?}");
    assert_eq!(degraded.reason, "MemberNotCatchingUp");
    assert!(degraded.message.contains("demo-4"), "{}", degraded.message);

    local.set_replicas(3);
    local.wait_for_voters(3);
    let events = local.events();
    assert!(events.iter().any(|e| e.contains("MemberRemoved demo-4")), "{events:#?}");
    assert!(!events.iter().any(|e| e.contains("VotersChanged")), "{events:#?}");
    assert!(!local.state().join("demo").join("demo-4").exists());
}

/// Issue 12, item 4: status changes with the cluster, not with every write. The local
/// operator rewrites its status file every second, so what it holds is what status would
/// be each time; on Kubernetes an unchanged status is not written and wakes no reconcile.
#[test]
fn status_stays_the_same_while_four_clients_write_as_fast_as_they_can() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let runtime = runtime();
    let mut local = Local::new();
    local.start(None);
    let steady = local.wait_for_voters(3);
    let endpoints = original_endpoints(&local);
    let writers: Vec<Writer> = (0..4).map(|_| Writer::start(&runtime, endpoints.clone())).collect();

    let status_file = local.state().join("demo.status.yaml");
    let written = || std::fs::metadata(&status_file).and_then(|m| m.modified()).ok();
    let (mut seen, mut rewrites, mut last_written) = (vec![steady], 0, written());
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(250));
        if written() != last_written {
            (rewrites, last_written) = (rewrites + 1, written());
        }
        if let Some(status) = local.status()
            && seen.last() != Some(&status)
        {
            seen.push(status);
        }
    }
    for writer in &writers {
        writer.stop();
    }
    let acknowledged: usize =
        writers.iter().map(|w| w.acknowledged.lock().map(|a| a.len()).unwrap_or(0)).sum();
    eprintln!(
        "{acknowledged} writes acknowledged in 10 s; {} distinct statuses in {rewrites} rewrites",
        seen.len()
    );
    assert!(acknowledged > 100, "the load hardly ran: {acknowledged} writes");
    // Written once a second while it reconciles: a stalled operator would prove nothing.
    assert!(rewrites >= 5, "the status was rewritten {rewrites} times in 10 s\n{}", local.log());
    assert_eq!(seen.len(), 1, "status changed under load: {seen:#?}");
    // Not asserted: on two loaded cores the slower follower, which no commit waits for, may
    // fall behind, and an unknown leader index (seen twice in about fifteen runs, cause not
    // yet found) makes every member unknown; the plan tests pin the rule itself.
    let caught_up: Vec<(&str, Option<bool>)> =
        seen[0].members.iter().map(|m| (m.name.as_str(), m.caught_up)).collect();
    eprintln!("caught up: {caught_up:?}");
}
