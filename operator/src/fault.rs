//! Fault points, for tests that crash the operator at a chosen place and check that the
//! next run finishes what this one started: `CONSENSUS_OPERATOR_FAULT_AFTER` names the
//! points (comma-separated), and a run that reaches one exits at once, as a crash would: no
//! cleanup, nothing more written. Locally a point is a step's name or a part of one
//! (`RecoverSnapshot`); on Kubernetes it is the reason of an Event a reconcile told, the
//! reconcile dying once its status and Events are written. On Kubernetes the variable is
//! set on the Deployment, so every replica and restart dies at the first listed point it
//! reaches; a point already passed is not reached again when the next run carries on.

use std::sync::OnceLock;

/// Exit status of a run killed by a fault point, distinct from any error exit.
pub const FAULT_EXIT: i32 = 86;
const FAULT_ENV: &str = "CONSENSUS_OPERATOR_FAULT_AFTER";

fn points() -> &'static [String] {
    static POINTS: OnceLock<Vec<String>> = OnceLock::new();
    POINTS.get_or_init(|| parse(&std::env::var(FAULT_ENV).unwrap_or_default()))
}

fn parse(value: &str) -> Vec<String> {
    value.split(',').map(str::trim).filter(|p| !p.is_empty()).map(str::to_owned).collect()
}

/// Dies here when `point` is one of the fault points.
pub fn reached(point: &str) {
    if points().iter().any(|p| p == point) {
        tracing::error!(point, "{FAULT_ENV}: exiting right after this point");
        std::process::exit(FAULT_EXIT);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn points_are_listed_by_name_with_commas() {
        assert_eq!(
            super::parse(" RecoveryStarted,RecoveryRestore ,,"),
            ["RecoveryStarted", "RecoveryRestore"]
        );
        assert!(super::parse("").is_empty());
    }
}
