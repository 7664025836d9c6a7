//! Lease expiry, decided by the leader alone with its own monotonic clock.
//!
//! Followers keep no clock: a lease's deadline lives only in the leader's memory. A leader
//! that sees a lease for the first time (a new grant, or every lease right after it was
//! elected) gives it its full TTL from that moment, so a leader change extends leases and
//! never expires one early, and no two machines' clocks are ever compared. An expired lease
//! is revoked through the log like a client's revoke.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use tokio::time::Instant;

use crate::api::errors::{ApplyError, ServerError};
use crate::member::Node;
use crate::proto::etcdserverpb::LeaseRevokeRequest;
use crate::raft::types::{Applied, Command};

/// How often the leader looks for expired leases: the precision of expiry.
const EXPIRY_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// etcd's upper bound on a lease's TTL.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// The leader's deadlines for the leases it knows.
pub struct LeaseClock {
    /// The shortest TTL granted: a lease must outlive a leader election.
    pub min_ttl: i64,
    deadlines: Mutex<Deadlines>,
}

#[derive(Default)]
struct Deadlines {
    /// The term the deadlines were set in; a new term starts them afresh.
    term: u64,
    by_lease: HashMap<i64, Instant>,
}

impl LeaseClock {
    /// `min_ttl` as etcd derives it: one and a half election timeouts, rounded up to seconds.
    pub fn new(election_timeout: Duration) -> Self {
        let min_ttl = ((election_timeout.as_millis() as u64 * 3 / 2).div_ceil(1000) as i64).max(1);
        Self { min_ttl, deadlines: Mutex::new(Deadlines::default()) }
    }

    fn with_deadlines<T>(&self, term: u64, f: impl FnOnce(&mut HashMap<i64, Instant>) -> T) -> T {
        let mut deadlines = self.deadlines.lock().unwrap_or_else(|e| e.into_inner());
        if deadlines.term != term {
            deadlines.term = term;
            deadlines.by_lease.clear();
        }
        f(&mut deadlines.by_lease)
    }

    /// Renews a lease (KeepAlive) on the leader in `term`; `ttl` is its granted TTL. A lease
    /// whose deadline has passed is not renewed (its revoke may be on its way through the
    /// log) and `false` says so, as etcd refuses to renew an expired lease.
    pub fn renew(&self, term: u64, id: i64, ttl: i64, now: Instant) -> bool {
        self.with_deadlines(term, |deadlines| {
            if deadlines.get(&id).is_some_and(|deadline| *deadline <= now) {
                return false;
            }
            deadlines.insert(id, now + ttl_duration(ttl));
            true
        })
    }

    /// Seconds left before the lease expires, as the leader in `term` sees it.
    pub fn remaining(&self, term: u64, id: i64, ttl: i64, now: Instant) -> i64 {
        self.with_deadlines(term, |deadlines| {
            let deadline = *deadlines.entry(id).or_insert(now + ttl_duration(ttl));
            deadline.saturating_duration_since(now).as_secs_f64().ceil() as i64
        })
    }

    /// Reconciles the deadlines with the leases that exist (`(id, ttl)`) and returns the
    /// expired ones. Leases seen for the first time get their full TTL from `now`.
    pub fn expired(&self, term: u64, leases: &[(i64, i64)], now: Instant) -> Vec<i64> {
        self.with_deadlines(term, |deadlines| {
            let existing: std::collections::HashSet<i64> = leases.iter().map(|(id, _)| *id).collect();
            deadlines.retain(|id, _| existing.contains(id));
            leases
                .iter()
                .filter(|(id, ttl)| *deadlines.entry(*id).or_insert(now + ttl_duration(*ttl)) <= now)
                .map(|(id, _)| *id)
                .collect()
        })
    }
}

/// While this member leads, revokes the leases whose deadline has passed.
pub async fn expire_leases(
    node: Arc<Node>,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(EXPIRY_CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut stop => return Ok(()),
            _ = tick.tick() => {}
        }
        let Some(term) = node.leading_term() else { continue };
        let leases = match node.store.read().and_then(|view| view.leases()) {
            Ok(leases) => leases,
            Err(e) => {
                tracing::warn!("reading leases: {e}");
                continue;
            }
        };
        for id in node.leases.expired(term, &leases, Instant::now()) {
            let revoke = Command::LeaseRevoke(LeaseRevokeRequest { id }.encode_to_vec());
            match node.write(revoke).await {
                Ok(Applied::Response(_)) => tracing::info!(lease = %format!("{id:x}"), "lease expired"),
                // Revoked meanwhile by its owner.
                Ok(Applied::Error(ApplyError::LeaseNotFound)) => {}
                Ok(other) => {
                    tracing::warn!(lease = %format!("{id:x}"), "revoking an expired lease: {other:?}")
                }
                // Leadership moved on: the next leader starts the lease's TTL afresh.
                Err(ServerError::LeaderChanged | ServerError::NoLeader) => break,
                Err(e) => tracing::warn!(lease = %format!("{id:x}"), "revoking an expired lease: {e}"),
            }
        }
    }
}

fn ttl_duration(ttl: i64) -> Duration {
    Duration::from_secs(ttl.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_expires_after_its_ttl_without_renewal() {
        let clock = LeaseClock::new(Duration::from_secs(1));
        let start = Instant::now();
        assert!(clock.expired(1, &[(7, 5)], start).is_empty());
        assert!(clock.expired(1, &[(7, 5)], start + Duration::from_secs(4)).is_empty());
        assert_eq!(clock.expired(1, &[(7, 5)], start + Duration::from_secs(5)), vec![7]);
    }

    #[test]
    fn renewal_pushes_the_deadline_back() {
        let clock = LeaseClock::new(Duration::from_secs(1));
        let start = Instant::now();
        clock.expired(1, &[(7, 5)], start);
        assert!(clock.renew(1, 7, 5, start + Duration::from_secs(4)));
        assert!(clock.expired(1, &[(7, 5)], start + Duration::from_secs(8)).is_empty());
        assert_eq!(clock.remaining(1, 7, 5, start + Duration::from_secs(8)), 1);
    }

    #[test]
    fn an_expired_lease_is_not_renewed() {
        let clock = LeaseClock::new(Duration::from_secs(1));
        let start = Instant::now();
        clock.expired(1, &[(7, 5)], start);
        assert!(!clock.renew(1, 7, 5, start + Duration::from_secs(5)));
        assert_eq!(clock.expired(1, &[(7, 5)], start + Duration::from_secs(5)), vec![7]);
    }

    #[test]
    fn a_new_term_gives_every_lease_its_full_ttl_again() {
        let clock = LeaseClock::new(Duration::from_secs(1));
        let start = Instant::now();
        clock.expired(1, &[(7, 5)], start);
        let later = start + Duration::from_secs(6);
        assert!(clock.expired(2, &[(7, 5)], later).is_empty(), "a new leader must extend, not expire");
        assert_eq!(clock.remaining(2, 7, 5, later), 5);
    }

    #[test]
    fn revoked_leases_are_forgotten() {
        let clock = LeaseClock::new(Duration::from_secs(1));
        let start = Instant::now();
        clock.expired(1, &[(7, 5), (8, 5)], start);
        assert_eq!(clock.expired(1, &[(8, 5)], start + Duration::from_secs(5)), vec![8]);
        // Re-granted under the same id: a fresh deadline.
        assert!(clock.expired(1, &[(7, 5)], start + Duration::from_secs(6)).is_empty());
    }

    #[test]
    fn minimum_ttl_outlives_an_election() {
        assert_eq!(LeaseClock::new(Duration::from_millis(1000)).min_ttl, 2);
        assert_eq!(LeaseClock::new(Duration::from_millis(100)).min_ttl, 1);
    }
}
