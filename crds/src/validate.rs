//! Checks the operator runs on every spec it reconciles. The CRD's schema and CEL rules
//! reject most of these at admission, but older API servers drop CEL rules and a spec
//! can be written while the CRD is being upgraded, so the controller checks again and
//! refuses to act on anything invalid.

use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

use crate::{ConsensusClusterSpec, parse_duration};

/// One thing wrong with a spec, with the field it concerns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spec.{field}: {message}")]
pub struct SpecProblem {
    pub field: &'static str,
    pub message: String,
}

/// Parses a backup schedule the way the operator runs it: five fields, no seconds.
pub fn parse_schedule(schedule: &str) -> Result<Cron, croner::errors::CronError> {
    CronParser::builder().seconds(Seconds::Disallowed).year(Year::Disallowed).build().parse(schedule)
}

/// Every problem with `spec`; empty when the operator may act on it.
pub fn validate_spec(spec: &ConsensusClusterSpec) -> Vec<SpecProblem> {
    let mut problems = Vec::new();
    if !(1..=9).contains(&spec.replicas) || spec.replicas % 2 == 0 {
        problems.push(SpecProblem {
            field: "replicas",
            message: format!("{} is not allowed: {}", spec.replicas, crate::REPLICAS_RULE_MESSAGE),
        });
    }
    if let Some(backup) = &spec.backup {
        if let Err(err) = parse_schedule(&backup.schedule) {
            problems.push(SpecProblem {
                field: "backup.schedule",
                message: format!("{:?} is not a valid five-field cron schedule: {err}", backup.schedule),
            });
        }
        let destination = &backup.destination;
        if destination.s3.is_some() == destination.volume.is_some() {
            problems.push(SpecProblem {
                field: "backup.destination",
                message: "set exactly one backup destination: s3 or volume".to_owned(),
            });
        }
        if let Some(Err(err)) = backup.retention.max_age.as_deref().map(parse_duration) {
            problems.push(SpecProblem { field: "backup.retention.maxAge", message: err.to_string() });
        }
    }
    if let Err(err) = parse_duration(&spec.recovery.quorum_loss_timeout) {
        problems.push(SpecProblem { field: "recovery.quorumLossTimeout", message: err.to_string() });
    }
    if spec.bootstrap.as_ref().is_some_and(|b| b.from_backup.is_some()) {
        problems.extend(from_backup_problems(spec));
    }
    problems
}

/// A cluster made from a backup reads it with `spec.backup.destination`'s settings, and
/// never starts on an earlier cluster's volumes: they hold another cluster, not the backup.
fn from_backup_problems(spec: &ConsensusClusterSpec) -> Vec<SpecProblem> {
    let mut problems = Vec::new();
    if spec.backup.is_none() {
        problems.push(SpecProblem {
            field: "bootstrap.fromBackup",
            message: "the backup is read from spec.backup.destination, and there is no spec.backup"
                .to_owned(),
        });
    }
    if spec.storage.existing_volumes == crate::ExistingVolumePolicy::Adopt {
        problems.push(SpecProblem {
            field: "storage.existingVolumes",
            message:
                "Adopt resumes the cluster an earlier one left on its volumes, and bootstrap.fromBackup \
                      makes a new one from a backup: set one of them"
                    .to_owned(),
        });
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        BackupDestination, BackupSpec, BootstrapSpec, ExistingVolumePolicy, FromBackupSpec, RetentionSpec,
        VolumeDestination,
    };

    #[test]
    fn a_cluster_from_a_backup_needs_a_destination_and_never_adopts_volumes() {
        let from_backup = |spec: ConsensusClusterSpec| ConsensusClusterSpec {
            bootstrap: Some(BootstrapSpec { from_backup: Some(FromBackupSpec::default()) }),
            ..spec
        };
        assert_eq!(validate_spec(&from_backup(with_backup("@daily", None))), vec![]);
        let fields =
            |spec: &ConsensusClusterSpec| validate_spec(spec).iter().map(|p| p.field).collect::<Vec<_>>();
        assert_eq!(fields(&from_backup(spec(3))), ["bootstrap.fromBackup"]);
        let mut adopting = from_backup(with_backup("@daily", None));
        adopting.storage.existing_volumes = ExistingVolumePolicy::Adopt;
        assert_eq!(fields(&adopting), ["storage.existingVolumes"]);
        // An empty bootstrap section asks for nothing.
        let empty = ConsensusClusterSpec { bootstrap: Some(BootstrapSpec::default()), ..spec(3) };
        assert_eq!(validate_spec(&empty), vec![]);
    }

    fn spec(replicas: i32) -> ConsensusClusterSpec {
        serde_json::from_value(serde_json::json!({ "replicas": replicas })).expect("spec parses")
    }

    fn with_backup(schedule: &str, max_age: Option<&str>) -> ConsensusClusterSpec {
        ConsensusClusterSpec {
            backup: Some(BackupSpec {
                schedule: schedule.to_owned(),
                destination: BackupDestination {
                    s3: None,
                    volume: Some(VolumeDestination { claim_name: "backups".into(), path: "/".into() }),
                },
                retention: RetentionSpec { max_count: 3, max_age: max_age.map(str::to_owned), tiered: false },
                suspend: false,
            }),
            ..spec(3)
        }
    }

    #[test]
    fn odd_counts_from_one_to_nine_are_valid() {
        for n in [1, 3, 5, 7, 9] {
            assert_eq!(validate_spec(&spec(n)), vec![], "{n}");
        }
    }

    #[test]
    fn even_and_out_of_range_counts_are_refused_with_the_reason() {
        for n in [0, 2, 4, 10, 11, -1] {
            let problems = validate_spec(&spec(n));
            assert_eq!(problems.len(), 1, "{n}");
            assert_eq!(problems[0].field, "replicas");
            assert!(problems[0].to_string().contains("odd number between 1 and 9"));
        }
    }

    #[test]
    fn schedules_are_parsed_as_five_field_cron() {
        for good in ["0 */6 * * *", "@daily", "30 2 * * 1-5"] {
            assert_eq!(validate_spec(&with_backup(good, None)), vec![], "{good}");
        }
        for bad in ["every day", "61 * * * *", "* * * * * *", "0 0 32 * *"] {
            let problems = validate_spec(&with_backup(bad, None));
            assert_eq!(problems.len(), 1, "{bad}: {problems:?}");
            assert_eq!(problems[0].field, "backup.schedule");
            assert!(problems[0].message.contains(bad));
        }
    }

    #[test]
    fn retention_age_and_destination_are_checked() {
        let problems = validate_spec(&with_backup("@daily", Some("a week")));
        assert_eq!(problems[0].field, "backup.retention.maxAge");
        let mut neither = with_backup("@daily", None);
        if let Some(backup) = neither.backup.as_mut() {
            backup.destination.volume = None;
        }
        assert_eq!(validate_spec(&neither)[0].field, "backup.destination");
    }
}
