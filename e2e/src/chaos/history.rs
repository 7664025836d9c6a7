//! What a chaos run records: every client request with its call and return times (the
//! history the linearizability checker reads), the events the live watch delivered, the lock
//! acquisitions, and the checks that need no model: no acknowledged write lost, watch
//! guarantees, lock revisions.

use std::collections::HashMap;

use serde::Serialize;

/// One client request, in the shape `e2e/chaos-checker` reads (see its `Op`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Op {
    pub client: usize,
    /// Nanoseconds since the load started.
    pub call: i64,
    /// Nanoseconds since the load started; -1 for an unknown outcome.
    #[serde(rename = "return")]
    pub ret: i64,
    pub kind: &'static str,
    pub key: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub value: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub lease: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expect: Option<String>,
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "is_false")]
    pub found: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub read: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub deleted: i64,
    #[serde(skip_serializing_if = "is_false")]
    pub succeeded: bool,
    /// The revision the answer carried, for the lost-write check and for dating writes of
    /// unknown outcome; not the checker's.
    #[serde(skip)]
    pub revision: i64,
    /// A serializable read: left out of the linearizability check (it may be stale).
    #[serde(skip)]
    pub serializable: bool,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Serialize)]
struct CheckerInput<'a> {
    operations: Vec<&'a Op>,
}

/// The history for the linearizability checker: every operation but serializable reads.
pub fn checker_json(ops: &[Op]) -> String {
    let operations = ops.iter().filter(|o| !o.serializable).collect();
    serde_json::to_string(&CheckerInput { operations }).expect("a history serializes")
}

/// One change as a watch reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub revision: i64,
    pub key: String,
    /// None for a delete.
    pub value: Option<String>,
}

/// Writes of unknown outcome (no answer came), settled by the store's own history where it
/// can tell, as etcd's robustness tests do:
/// - a put or swap whose (unique) value is not in it never happened, and is dropped;
/// - one whose value is in it at revision R happened (a swap: succeeded), and before the
///   first answer of any request that saw revision R or later: that answer is its return.
///   Left open-ended, it could be placed after reads that could not have missed it, and
///   stale reads would pass the check;
/// - one no answer saw stays open-ended (it may have happened any time after its call).
pub fn settle_unknown_writes(ops: Vec<Op>, all: &[Event]) -> Vec<Op> {
    let stored: HashMap<(&str, &str), i64> =
        all.iter().filter_map(|e| Some(((e.key.as_str(), e.value.as_deref()?), e.revision))).collect();
    // The earliest return of an answer that saw each revision or a later one.
    let mut seen: Vec<(i64, i64)> =
        ops.iter().filter(|o| o.outcome == "ok" && o.revision > 0).map(|o| (o.revision, o.ret)).collect();
    seen.sort_unstable();
    for i in (0..seen.len().saturating_sub(1)).rev() {
        seen[i].1 = seen[i].1.min(seen[i + 1].1);
    }
    let first_seen = |revision: i64| {
        let from = seen.partition_point(|(r, _)| *r < revision);
        seen.get(from).map(|(_, ret)| *ret)
    };
    ops.into_iter()
        .filter_map(|mut op| {
            if op.outcome != "unknown" || !matches!(op.kind, "put" | "cas") {
                return Some(op);
            }
            let revision = *stored.get(&(op.key.as_str(), op.value.as_str()))?;
            if let Some(ret) = first_seen(revision) {
                op.outcome = "ok";
                op.ret = ret.max(op.call);
                op.succeeded = true;
                op.revision = revision;
            }
            Some(op)
        })
        .collect()
}

/// Every acknowledged write must be in the store's history (`all`, every event from
/// revision 1) at the revision its answer carried: a put with its value, a delete that
/// deleted something as a delete. Returns what is missing.
pub fn lost_writes(ops: &[Op], all: &[Event]) -> Vec<String> {
    let mut lost = Vec::new();
    for op in ops.iter().filter(|o| o.outcome == "ok") {
        let expected = match op.kind {
            "put" => Some(Some(op.value.clone())),
            "cas" if op.succeeded => Some(Some(op.value.clone())),
            "delete" if op.deleted > 0 => Some(None),
            _ => None,
        };
        let Some(value) = expected else { continue };
        let wanted = Event { revision: op.revision, key: op.key.clone(), value };
        if !all.contains(&wanted) {
            lost.push(format!(
                "{} of {} acknowledged at revision {} is not in the history (client {}, answered {:.3} s into the load)",
                op.kind,
                op.key,
                op.revision,
                op.client,
                op.ret as f64 / 1e9
            ));
        }
    }
    lost
}

/// The live watch's events against the store's history: in revision order, none twice, none
/// left out from the revision it started at (`from`) to the final one (`until`), each as the
/// history has it.
pub fn watch_violations(delivered: &[Event], all: &[Event], from: i64, until: i64) -> Vec<String> {
    let mut violations = Vec::new();
    for pair in delivered.windows(2) {
        if pair[1].revision < pair[0].revision {
            violations.push(format!("revision {} delivered after {}", pair[1].revision, pair[0].revision));
        }
    }
    // Events past `until` (a lease expiring after the final reads) are outside the history.
    let within = |e: &&Event| e.revision >= from && e.revision <= until;
    let got: Vec<&Event> = delivered.iter().filter(within).collect();
    let expected: Vec<&Event> = all.iter().filter(within).collect();
    if got != expected {
        let position =
            got.iter().zip(&expected).position(|(a, b)| a != b).unwrap_or(got.len().min(expected.len()));
        violations.push(format!(
            "the watch delivered {} events for revisions {from}..={until}, the history has {}; first difference at {}: {:?} vs {:?}",
            got.len(),
            expected.len(),
            position,
            got.get(position),
            expected.get(position)
        ));
    }
    violations
}

/// A lock acquisition: when its lease was asked for, when the lock was acknowledged and
/// released (the Unlock call), and its fencing token (the lock key's create revision).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acquisition {
    pub lease_asked: i64,
    pub acknowledged: i64,
    pub released: i64,
    pub revision: i64,
}

/// The TTL of the leases the lock clients hold their locks with, in the history's time.
pub const LOCK_LEASE_NS: i64 = 10_000_000_000;

impl Acquisition {
    /// Until when the holder certainly held it: until it let go, or its lease could first
    /// expire (no earlier than its TTL after it was asked for).
    fn held_until(&self) -> i64 {
        self.released.min(self.lease_asked + LOCK_LEASE_NS)
    }
}

/// Fencing tokens strictly increase in the order the locks were granted, and no lock is
/// granted while an earlier holder (a lower token) still holds it.
pub fn lock_violations(acquisitions: &[Acquisition]) -> Vec<String> {
    let mut sorted = acquisitions.to_vec();
    sorted.sort_by_key(|a| a.acknowledged);
    let mut violations: Vec<String> = sorted
        .windows(2)
        .filter(|pair| pair[1].revision <= pair[0].revision)
        .map(|pair| {
            format!(
                "a lock granted after one of revision {} has revision {}",
                pair[0].revision, pair[1].revision
            )
        })
        .collect();
    for earlier in &sorted {
        for later in sorted.iter().filter(|l| l.revision > earlier.revision) {
            if later.acknowledged < earlier.held_until() {
                violations.push(format!(
                    "two holders at once: the lock of revision {} was granted at {} ns, while the holder of \
                     revision {} held it (from {} ns until it let go at {} ns, its lease unexpired)",
                    later.revision,
                    later.acknowledged,
                    earlier.revision,
                    earlier.acknowledged,
                    earlier.released
                ));
            }
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(revision: i64, key: &str, value: Option<&str>) -> Event {
        Event { revision, key: key.to_owned(), value: value.map(str::to_owned) }
    }

    fn put(key: &str, value: &str, revision: i64) -> Op {
        Op {
            kind: "put",
            key: key.into(),
            value: value.into(),
            outcome: "ok",
            revision,
            ..Default::default()
        }
    }

    #[test]
    fn an_acknowledged_put_missing_from_the_history_is_lost() {
        let all = [event(2, "a", Some("1")), event(3, "b", Some("2"))];
        assert!(lost_writes(&[put("a", "1", 2), put("b", "2", 3)], &all).is_empty());
        assert_eq!(lost_writes(&[put("a", "9", 4)], &all).len(), 1);
        let unknown = Op { outcome: "unknown", ..put("c", "3", 0) };
        assert!(lost_writes(&[unknown], &all).is_empty(), "a write of unknown outcome may be gone");
    }

    #[test]
    fn a_watch_with_a_gap_a_duplicate_or_out_of_order_is_caught() {
        let all = [
            event(2, "a", Some("1")),
            event(3, "a", Some("2")),
            event(4, "a", None),
            event(5, "b", Some("3")),
        ];
        let check = |delivered: &[Event]| watch_violations(delivered, &all, 3, 5);
        assert!(check(&all[1..]).is_empty());
        assert!(!check(&[all[1].clone(), all[3].clone()]).is_empty(), "gap");
        assert!(
            !check(&[all[1].clone(), all[1].clone(), all[2].clone(), all[3].clone()]).is_empty(),
            "duplicate"
        );
        assert!(!check(&[all[2].clone(), all[1].clone(), all[3].clone()]).is_empty(), "order");
        assert!(
            !check(&[event(3, "a", Some("other")), all[2].clone(), all[3].clone()]).is_empty(),
            "disagrees with the KV history"
        );
        // A watch that stopped early, or started late, missed events it was owed.
        assert!(!check(&all[1..3]).is_empty(), "stopped before the final revision");
        assert!(!check(&all[2..]).is_empty(), "began after its start revision");
        assert!(!check(&[]).is_empty(), "delivered nothing");
        // Events past the final revision are not the history's to judge.
        let later = [all[1].clone(), all[2].clone(), all[3].clone(), event(6, "b", None)];
        assert!(check(&later).is_empty());
    }

    fn held(lease_asked: i64, acknowledged: i64, released: i64, revision: i64) -> Acquisition {
        Acquisition { lease_asked, acknowledged, released, revision }
    }

    #[test]
    fn fencing_tokens_must_increase_in_grant_order() {
        let granted =
            |acknowledged, revision| held(acknowledged - 5, acknowledged, acknowledged + 1, revision);
        assert!(lock_violations(&[granted(10, 5), granted(20, 9), granted(30, 12)]).is_empty());
        assert_eq!(lock_violations(&[granted(10, 5), granted(20, 5)]).len(), 1);
        // Revision 7 granted before revision 4 was: a token that went down, and a grant while
        // the lower token's holder was still to get and hold it.
        assert_eq!(lock_violations(&[granted(20, 4), granted(10, 7)]).len(), 2);
    }

    #[test]
    fn a_lock_granted_while_an_earlier_holder_holds_it_is_two_holders_at_once() {
        // Granted at 20, released at 40: the next holder may be granted only after 40.
        assert!(lock_violations(&[held(10, 20, 40, 5), held(15, 45, 50, 9)]).is_empty());
        let overlapping = lock_violations(&[held(10, 20, 40, 5), held(15, 30, 50, 9)]);
        assert_eq!(overlapping.len(), 1, "{overlapping:?}");
        assert!(overlapping[0].contains("two holders at once"), "{overlapping:?}");
        // An earlier holder whose lease may have expired no longer holds it for sure.
        let expired = held(0, 20, 2 * LOCK_LEASE_NS, 5);
        assert!(lock_violations(&[expired, held(15, LOCK_LEASE_NS + 1, 3 * LOCK_LEASE_NS, 9)]).is_empty());
        assert_eq!(lock_violations(&[expired, held(15, LOCK_LEASE_NS - 1, 3 * LOCK_LEASE_NS, 9)]).len(), 1);
    }

    #[test]
    fn a_write_of_unknown_outcome_returns_when_an_answer_first_saw_its_revision() {
        let unknown = |kind, value: &str, call| Op {
            kind,
            key: "a".into(),
            value: value.into(),
            call,
            ret: -1,
            outcome: "unknown",
            ..Default::default()
        };
        let answered = |revision, ret| Op {
            kind: "get",
            key: "b".into(),
            outcome: "ok",
            revision,
            ret,
            ..Default::default()
        };
        let all = [event(5, "a", Some("stored")), event(6, "a", Some("swapped"))];
        let ops = vec![
            unknown("put", "stored", 10),
            unknown("cas", "swapped", 12),
            unknown("put", "never", 14),
            answered(4, 20),
            answered(7, 40),
            answered(5, 50),
        ];
        let settled = settle_unknown_writes(ops, &all);
        // The put at revision 5: first seen by the answer of revision 7 at 40 (the one of
        // revision 4 came earlier but could not have seen it).
        assert_eq!((settled[0].outcome, settled[0].ret), ("ok", 40));
        assert_eq!((settled[1].outcome, settled[1].ret, settled[1].succeeded), ("ok", 40, true));
        assert_eq!(settled.len(), 5, "the put that is not in the history is dropped");
        // A write no answer saw stays open-ended.
        let alone = settle_unknown_writes(vec![unknown("put", "stored", 10)], &all);
        assert_eq!((alone[0].outcome, alone[0].ret), ("unknown", -1));
    }

    #[test]
    fn serializable_reads_are_left_out_of_the_checker_history() {
        let stale = Op { kind: "get", serializable: true, outcome: "ok", ..Default::default() };
        let json = checker_json(&[put("a", "1", 2), stale]);
        assert_eq!(json.matches("\"kind\"").count(), 1, "{json}");
        assert!(json.contains("\"return\":0"), "{json}");
    }
}
