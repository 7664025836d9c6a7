//! Consensus glue over openraft: type configuration, log storage, state machine, network.

pub mod log_store;
pub mod network;
pub mod state_machine;
pub mod types;

use std::time::Duration;

/// openraft's `(election_timeout_min, election_timeout_max)` in milliseconds for etcd's
/// `--election-timeout` and `--heartbeat-interval`.
///
/// After the last heartbeat a follower first waits out the leader lease, which openraft
/// fixes at `election_timeout_max`, then an election timeout drawn from `[min, max)`. etcd
/// stands for election after a timeout drawn from `[E, 2E)` and refuses (pre-)votes for `E`
/// after hearing from its leader. With `max = E` both hold here too: the lease is etcd's `E`,
/// and lease plus timeout falls in `[E + min, 2E)`.
///
/// `min` is half the election timeout (and at least one and a half heartbeats, which
/// openraft needs to outlast a heartbeat's gap), because openraft also gives each vote and
/// pre-vote request `min` to be answered, and a vote is answered only once the voter's
/// hard state is fsync'ed. At one and a half heartbeats (75 ms in the chaos harness, 150 ms
/// by default) a loaded machine answered no vote in time, and five members stood for
/// election for over 30 s without electing anyone (CI, `make chaos-ci`, the five-member run).
/// The price: a follower stands after `[1.5E, 2E)` rather than etcd's `[E, 2E)`.
pub fn election_timeouts(election: Duration, heartbeat: Duration) -> (u64, u64) {
    let max = election.as_millis() as u64;
    let heartbeat = heartbeat.as_millis() as u64;
    ((max / 2).max(heartbeat + heartbeat.div_ceil(2)), max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_stands_for_election_within_etcds_window() {
        for (election, heartbeat) in [(1000, 100), (500, 50), (5000, 1000), (10, 2), (1000, 1)] {
            let (min, max) =
                election_timeouts(Duration::from_millis(election), Duration::from_millis(heartbeat));
            let config = openraft::Config {
                heartbeat_interval: heartbeat,
                election_timeout_min: min,
                election_timeout_max: max,
                ..openraft::Config::default()
            };
            config.validate().unwrap_or_else(|e| panic!("E={election} hb={heartbeat}: {e}"));
            // The lease is max, and the election follows after a draw from [min, max): within
            // etcd's [E, 2E) after the last heartbeat, as validate() checked min < max.
            assert_eq!(max, election, "refuses votes for etcd's election timeout after the last heartbeat");
            // openraft's deadline for answering a vote request.
            assert!(
                min >= election / 2,
                "E={election} hb={heartbeat}: votes must be answered within {min} ms"
            );
        }
    }
}
