//! Quorum loss, as status reports it: when it started (the `QuorumLost` condition's
//! transition to True, kept across reconciles and operator restarts) and the event each
//! platform reports when it starts and when it ends. Recovering from it (from a survivor or
//! a backup) is not built yet: `QuorumLost` says so when `spec.recovery.autoRestore` asks.

use consensus_crds::{ConsensusClusterStatus, condition};
use k8s_openapi::jiff::Timestamp;

/// When the cluster lost its quorum, while it has not regained it.
pub fn quorum_lost_since(status: Option<&ConsensusClusterStatus>) -> Option<Timestamp> {
    let lost = status?.conditions.iter().find(|c| c.type_ == condition::QUORUM_LOST && c.status == "True")?;
    Some(lost.last_transition_time.0)
}

/// How the start or end of a quorum loss is reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumEvent {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
}

/// The event for a quorum lost (a Warning, at once: whatever the timeout, someone should
/// look) or regained between the status before and the one now.
pub fn quorum_event(
    previous: Option<&ConsensusClusterStatus>,
    next: &ConsensusClusterStatus,
) -> Option<QuorumEvent> {
    let lost_before = quorum_lost_since(previous);
    let lost_now = quorum_lost_since(Some(next));
    match (lost_before, lost_now) {
        (None, Some(_)) => {
            let message = next
                .conditions
                .iter()
                .find(|c| c.type_ == condition::QUORUM_LOST)
                .map(|c| c.message.clone())
                .unwrap_or_default();
            Some(QuorumEvent { warning: true, reason: "QuorumLost", message })
        }
        (Some(since), None) => {
            let regained = next
                .conditions
                .iter()
                .find(|c| c.type_ == condition::QUORUM_LOST)
                .map_or(since, |c| c.last_transition_time.0);
            let seconds = regained.duration_since(since).as_secs();
            // As status writes times: to the second.
            let since = Timestamp::from_second(since.as_second()).unwrap_or(since);
            Some(QuorumEvent {
                warning: false,
                reason: "QuorumRegained",
                message: format!(
                    "a leader and a quorum of healthy voters again, {seconds} s after it was lost at {since}"
                ),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    use super::*;

    fn with_quorum_lost(lost: bool, at: &str) -> ConsensusClusterStatus {
        ConsensusClusterStatus {
            conditions: vec![Condition {
                type_: condition::QUORUM_LOST.to_owned(),
                status: if lost { "True" } else { "False" }.to_owned(),
                reason: if lost { "NotEnoughHealthyVoters" } else { "QuorumHealthy" }.to_owned(),
                message: if lost { "1 of 3 voters are healthy" } else { "a leader" }.to_owned(),
                observed_generation: Some(1),
                last_transition_time: Time(at.parse().expect("a time")),
            }],
            ..ConsensusClusterStatus::default()
        }
    }

    #[test]
    fn a_quorum_loss_is_told_when_it_starts_and_when_it_ends_once_each() {
        let healthy = with_quorum_lost(false, "2026-12-01T10:00:00Z");
        let lost = with_quorum_lost(true, "2026-12-01T10:05:00Z");
        assert_eq!(quorum_lost_since(Some(&lost)), Some("2026-12-01T10:05:00Z".parse().expect("a time")));
        assert_eq!(quorum_lost_since(Some(&healthy)), None);
        let started = quorum_event(Some(&healthy), &lost).expect("an event");
        assert_eq!((started.warning, started.reason), (true, "QuorumLost"));
        assert_eq!(started.message, "1 of 3 voters are healthy");
        // Also for an operator that starts on a cluster without quorum.
        assert_eq!(quorum_event(None, &lost).map(|e| e.reason), Some("QuorumLost"));
        assert_eq!(quorum_event(Some(&lost), &lost), None, "told once");
        let back =
            quorum_event(Some(&lost), &with_quorum_lost(false, "2026-12-01T10:06:40Z")).expect("an event");
        assert_eq!((back.warning, back.reason), (false, "QuorumRegained"));
        assert!(back.message.contains("100 s after it was lost at 2026-12-01T10:05:00Z"), "{}", back.message);
        assert_eq!(quorum_event(Some(&healthy), &healthy), None);
    }
}
