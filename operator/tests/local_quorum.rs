//! A quorum loss on the local platform, with real member processes: two of three members
//! paused (SIGSTOP: alive, so nobody restarts them, but silent) lose the quorum, which
//! status and a Warning event say at once; resumed, the cluster is Running again and an
//! event says how long it was without.

mod local_support;

use consensus_crds::{Phase, condition};
use local_support::{Local, kill, wait_until};

#[test]
fn a_quorum_lost_to_paused_members_is_told_at_once_and_so_is_its_end() {
    let mut local = Local::new();
    local.start(None);
    local.wait_for_voters(3);
    let context =
        |local: &Local| format!("status: {:#?}\nevents:\n{}", local.status(), local.events().join("\n"));
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
}
