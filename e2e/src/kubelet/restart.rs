//! Restart policy and the CrashLoopBackOff schedule.

use std::time::Duration;

pub const BACKOFF_INITIAL: Duration = Duration::from_secs(10);
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A container that ran this long without exiting starts its back-off afresh.
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    Always,
    OnFailure,
    Never,
}

impl Policy {
    pub fn parse(value: Option<&str>) -> Policy {
        match value {
            Some("OnFailure") => Policy::OnFailure,
            Some("Never") => Policy::Never,
            _ => Policy::Always,
        }
    }
}

/// Whether a container that exited with `exit_code` is started again.
pub fn should_restart(policy: Policy, exit_code: i32) -> bool {
    match policy {
        Policy::Always => true,
        Policy::OnFailure => exit_code != 0,
        Policy::Never => false,
    }
}

/// How long to wait before the next start after `crashes` consecutive exits (1 = the first).
/// Like the kubelet: the first restart is immediate, then 10 s doubling up to 300 s.
pub fn backoff(crashes: u32) -> Duration {
    if crashes <= 1 {
        return Duration::ZERO;
    }
    let exp = (crashes - 2).min(16);
    BACKOFF_INITIAL.saturating_mul(1u32 << exp).min(BACKOFF_MAX)
}

/// The consecutive-crash counter after a run that lasted `ran`.
pub fn next_crash_count(previous: u32, ran: Duration) -> u32 {
    if ran >= BACKOFF_RESET_AFTER { 1 } else { previous + 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_decides_restart() {
        assert!(should_restart(Policy::Always, 0));
        assert!(should_restart(Policy::Always, 1));
        assert!(!should_restart(Policy::OnFailure, 0));
        assert!(should_restart(Policy::OnFailure, 137));
        assert!(!should_restart(Policy::Never, 1));
        assert_eq!(Policy::parse(None), Policy::Always);
        assert_eq!(Policy::parse(Some("Never")), Policy::Never);
    }

    #[test]
    fn backoff_doubles_from_ten_seconds_to_five_minutes() {
        let secs: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, vec![0, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(backoff(1000), BACKOFF_MAX);
    }

    #[test]
    fn a_long_run_resets_the_back_off() {
        assert_eq!(next_crash_count(5, Duration::from_secs(30)), 6);
        assert_eq!(next_crash_count(5, Duration::from_secs(601)), 1);
    }
}
