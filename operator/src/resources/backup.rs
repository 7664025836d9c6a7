//! What a backup run executes and what it reports back, the same on both platforms: the
//! `consensus-node backup` command line (a Job's container on Kubernetes, a process
//! locally), and the outcome it writes to its report file (the Job's termination message,
//! a file locally).

use std::collections::BTreeMap;
use std::path::Path;

use consensus_crds::{
    BackupDestination, ConsensusCluster, ConsensusClusterSpec, RetentionSpec, S3Destination, parse_duration,
};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, PersistentVolumeClaimVolumeSource, PodSpec,
    PodTemplateSpec, SecretKeySelector, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use serde::Deserialize;

use super::statefulset::{container_security_context, pod_security_context};
use super::{BuildError, Cluster, labels, member_client_url};
use crate::plan::backup::{BackupRequest, RUN_DEADLINE, RunOutcome, Taken};

/// Annotations of a backup Job: what the run is, read back when it is observed.
pub const BACKUP_ANNOTATION: &str = "consensus.dev/backup";
pub const SLOT_ANNOTATION: &str = "consensus.dev/backup-slot";
pub const ATTEMPT_ANNOTATION: &str = "consensus.dev/backup-attempt";
pub const MEMBER_ANNOTATION: &str = "consensus.dev/backup-member";
/// The ConsensusBackup a run is for; absent on the schedule's runs.
pub const REQUEST_ANNOTATION: &str = "consensus.dev/backup-request";
/// `app.kubernetes.io/name` of backup runs: not the members' (`consensus-node`), so no
/// Service, budget or spread constraint of the members ever counts a backup pod.
pub const APP_NAME: &str = "consensus-backup";
pub const CONTAINER: &str = "backup";
/// Where a volume destination is mounted in the backup pod.
pub const VOLUME_MOUNT: &str = "/backup";
/// The container's termination message is the run's report.
const REPORT_PATH: &str = "/dev/termination-log";

/// Selects the backup runs of one cluster.
pub fn run_labels(cluster: &str) -> BTreeMap<String, String> {
    labels::run(APP_NAME, "backup", cluster)
}

pub fn run_selector(cluster: &str) -> String {
    labels::as_selector(&run_labels(cluster))
}

/// One backup run to make a Job (or process) of.
pub struct BackupJob<'a> {
    pub backup: &'a str,
    pub slot: Timestamp,
    pub attempt: u32,
    pub member: &'a str,
    pub destination: &'a BackupDestination,
    /// Applied after the backup is stored: the schedule's; a request's run deletes nothing.
    pub retention: Option<&'a RetentionSpec>,
    /// The ConsensusBackup it is for.
    pub request: Option<&'a str>,
}

impl<'a> BackupJob<'a> {
    /// The run a `TakeBackup` step asks for, its destination the request's or the
    /// schedule's; `None` when there is none.
    pub fn planned(
        spec: &'a ConsensusClusterSpec,
        backup: &'a str,
        (slot, attempt, member): (Timestamp, u32, &'a str),
        request: Option<&'a BackupRequest>,
    ) -> Option<Self> {
        Some(Self {
            backup,
            slot,
            attempt,
            member,
            destination: crate::plan::backup::destination(spec, request)?,
            retention: spec.backup.as_ref().filter(|_| request.is_none()).map(|b| &b.retention),
            request: request.map(|r| r.name.as_str()),
        })
    }

    /// `<cluster>-backup-<slot>-<attempt>` for the schedule's runs, `<request>-backup-<attempt>`
    /// for a request's.
    pub fn job_name(&self, cluster: &str) -> String {
        match self.request {
            None => job_name(cluster, &self.slot.strftime("%Y%m%d%H%M%S").to_string(), self.attempt),
            Some(request) => job_name(request, "", self.attempt),
        }
    }
}

/// `<owner>-backup[-<part>]-<attempt>`, within the 63 characters a Job's name may have (its
/// pods carry it as a label value): a long owner name is cut, the rest never.
fn job_name(owner: &str, part: &str, attempt: u32) -> String {
    let part = if part.is_empty() { String::new() } else { format!("-{part}") };
    super::job_name(owner, &format!("-backup{part}-{attempt}"))
}

/// The Job that takes `run`: the node image running `consensus-node backup` against the
/// member's own address, the S3 credentials from the Secret the destination names, a volume
/// destination mounted; it tries once (the planner decides retries) and is stopped at the
/// run deadline. Owned by the cluster, so deleting the cluster deletes its runs; a
/// request's run by the ConsensusBackup (`owner`), so deleting the request deletes it.
pub fn job(
    cc: &ConsensusCluster,
    run: &BackupJob<'_>,
    owner: Option<OwnerReference>,
) -> Result<Job, BuildError> {
    let cluster = Cluster::new(cc)?;
    let endpoint = member_client_url(cluster.name, cluster.namespace, run.member);
    let to = destination_url(run.destination, cluster.namespace, cluster.name, Path::new(VOLUME_MOUNT));
    let (env, volumes, mounts) = destination_access(Some(run.destination));
    let labels = run_labels(cluster.name);
    let mut annotations = BTreeMap::from([
        (BACKUP_ANNOTATION.to_owned(), run.backup.to_owned()),
        (SLOT_ANNOTATION.to_owned(), run.slot.to_string()),
        (ATTEMPT_ANNOTATION.to_owned(), run.attempt.to_string()),
        (MEMBER_ANNOTATION.to_owned(), run.member.to_owned()),
    ]);
    if let Some(request) = run.request {
        annotations.insert(REQUEST_ANNOTATION.to_owned(), request.to_owned());
    }
    let mut metadata = cluster.metadata(run.job_name(cluster.name));
    if let Some(owner) = owner {
        metadata.owner_references = Some(vec![owner]);
    }
    metadata.labels = Some(labels.clone());
    metadata.annotations = Some(annotations);
    Ok(Job {
        metadata,
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            active_deadline_seconds: Some(i64::try_from(RUN_DEADLINE.as_secs()).unwrap_or(i64::MAX)),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels), ..ObjectMeta::default() }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".to_owned()),
                    enable_service_links: Some(false),
                    security_context: Some(pod_security_context()),
                    containers: vec![Container {
                        name: CONTAINER.to_owned(),
                        image: Some(cc.spec.image.clone()),
                        image_pull_policy: Some("IfNotPresent".to_owned()),
                        command: Some(vec!["consensus-node".to_owned()]),
                        args: Some(command(run, &endpoint, &to, REPORT_PATH)),
                        env: (!env.is_empty()).then_some(env),
                        security_context: Some(container_security_context()),
                        volume_mounts: Some(mounts),
                        ..Container::default()
                    }],
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        status: None,
    })
}

/// What a pod needs to reach `destination`, if any: the S3 credentials from the Secret it names as
/// environment, or its claim mounted at [`VOLUME_MOUNT`]; and a scratch `/tmp`, as the root
/// filesystem is read-only.
pub(super) fn destination_access(
    destination: Option<&BackupDestination>,
) -> (Vec<EnvVar>, Vec<Volume>, Vec<VolumeMount>) {
    let mut env = Vec::new();
    let mut volumes = vec![Volume {
        name: "tmp".to_owned(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }];
    let mut mounts =
        vec![VolumeMount { name: "tmp".to_owned(), mount_path: "/tmp".to_owned(), ..VolumeMount::default() }];
    if let Some(s3) = destination.and_then(|d| d.s3.as_ref()) {
        let secret = &s3.credentials_secret;
        for (name, key) in [
            ("AWS_ACCESS_KEY_ID", &secret.access_key_id_key),
            ("AWS_SECRET_ACCESS_KEY", &secret.secret_access_key_key),
        ] {
            env.push(EnvVar {
                name: name.to_owned(),
                value: None,
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: secret.name.clone(),
                        key: key.clone(),
                        optional: Some(false),
                    }),
                    ..EnvVarSource::default()
                }),
            });
        }
    }
    if let Some(volume) = destination.and_then(|d| d.volume.as_ref()) {
        volumes.push(Volume {
            name: "destination".to_owned(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: volume.claim_name.clone(),
                read_only: Some(false),
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "destination".to_owned(),
            mount_path: VOLUME_MOUNT.to_owned(),
            ..VolumeMount::default()
        });
    }
    (env, volumes, mounts)
}

/// The `consensus-node` flags that reach an S3-compatible store (credentials come from the
/// environment).
pub fn s3_flags(s3: &S3Destination) -> Vec<String> {
    let mut args = vec!["--s3-region".to_owned(), s3.region.clone()];
    if let Some(endpoint) = &s3.endpoint {
        args.extend(["--s3-endpoint".to_owned(), endpoint.clone()]);
    }
    if s3.force_path_style {
        args.push("--s3-path-style".to_owned());
    }
    args
}

/// A stored backup's location (`status.lastBackup.location`) as the `--from` and `--name`
/// of `consensus-node fetch`: where it is stored, and its name without `.snapshot`.
pub fn stored_backup(location: &str) -> Option<(&str, &str)> {
    let (from, file) = location.rsplit_once('/')?;
    Some((from, file.strip_suffix(".snapshot")?)).filter(|(from, name)| !from.is_empty() && !name.is_empty())
}

/// The `--from` and `--name` of `consensus-node fetch` for the backup at `location`, and
/// where it is stored; a location that names no backup is a destination, whose newest
/// verified backup `--newest` fetches.
pub fn fetch_source(location: &str) -> (Vec<String>, &str) {
    match stored_backup(location) {
        Some((from, name)) => (["--from", from, "--name", name].map(str::to_owned).to_vec(), from),
        None => (["--from", location, "--newest"].map(str::to_owned).to_vec(), location),
    }
}

/// Where the backups of `cluster` go: `s3://BUCKET/PREFIX`, the prefix `<namespace>/<cluster>`
/// unless the spec names one; or the directory `path` inside the volume mounted at
/// `volume_root`.
pub fn destination_url(
    destination: &BackupDestination,
    namespace: &str,
    cluster: &str,
    volume_root: &Path,
) -> String {
    match (&destination.s3, &destination.volume) {
        (Some(s3), _) => {
            let prefix = s3
                .prefix
                .as_deref()
                .map(|p| p.trim_matches('/'))
                .filter(|p| !p.is_empty())
                .map_or_else(|| format!("{namespace}/{cluster}"), str::to_owned);
            format!("s3://{}/{prefix}", s3.bucket)
        }
        (None, Some(volume)) => {
            let dir = volume_root.join(volume.path.trim_start_matches('/'));
            format!("file://{}", dir.display().to_string().trim_end_matches('/'))
        }
        // The CRD's rule (and validate_spec, locally) wants exactly one.
        (None, None) => String::new(),
    }
}

/// One run's `consensus-node` arguments: the snapshot of the member at `endpoint` stored as
/// `backup` in `to`, retention applied after it, the outcome written to `report`. S3
/// credentials are not among them: they come from the environment, which no process
/// list shows.
pub fn command(run: &BackupJob<'_>, endpoint: &str, to: &str, report: &str) -> Vec<String> {
    // Every backup is verified before it counts: read back, restored into a scratch member
    // whose HashKV must be the cluster's.
    let mut args: Vec<String> =
        ["backup", "--endpoint", endpoint, "--to", to, "--name", run.backup, "--report", report, "--verify"]
            .map(str::to_owned)
            .to_vec();
    if let Some(s3) = &run.destination.s3 {
        args.extend(s3_flags(s3));
    }
    let Some(retention) = run.retention else { return args };
    args.extend(["--retain-count".to_owned(), retention.max_count.to_string()]);
    if let Some(max_age) = retention.max_age.as_deref().and_then(|age| parse_duration(age).ok()) {
        args.extend(["--retain-max-age-seconds".to_owned(), max_age.as_secs().to_string()]);
    }
    if retention.tiered {
        args.push("--retain-tiered".to_owned());
    }
    args
}

/// The report file, as `consensus-node backup --report` writes it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
enum Report {
    Succeeded { manifest: Manifest, pruned: Vec<String> },
    Failed { error: String },
}

/// The fields of a backup's manifest the operator records.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    location: String,
    sha256: String,
    size_bytes: u64,
    revision: i64,
    /// RFC 3339.
    taken: String,
    #[serde(default)]
    verified: Option<bool>,
    #[serde(default)]
    verification: Option<String>,
}

/// A finished run's outcome from its report; `finished` is when the run ended (a failure's
/// time). A report that cannot be read is a failure that says so.
pub fn outcome(report: &str, finished: Timestamp) -> RunOutcome {
    let unreadable = |why: String| RunOutcome::Failed {
        at: finished,
        reason: format!(
            "the run's report is unreadable ({why}): {}",
            report.chars().take(200).collect::<String>()
        ),
    };
    match serde_json::from_str::<Report>(report) {
        // Stored but not what the cluster held: no good backup, and tried again.
        Ok(Report::Succeeded { manifest, .. }) if manifest.verified == Some(false) => RunOutcome::Failed {
            at: finished,
            reason: format!(
                "stored at {} but it failed verification: {}",
                manifest.location,
                manifest.verification.as_deref().unwrap_or("no reason given")
            ),
        },
        Ok(Report::Succeeded { manifest, pruned }) => match manifest.taken.parse() {
            Ok(taken) => RunOutcome::Succeeded(Box::new(Taken {
                location: manifest.location,
                sha256: manifest.sha256,
                size_bytes: manifest.size_bytes,
                revision: manifest.revision,
                taken,
                pruned,
                verified: manifest.verified,
                finished,
            })),
            Err(error) => unreadable(format!("taken: {error}")),
        },
        Ok(Report::Failed { error }) => RunOutcome::Failed { at: finished, reason: error },
        Err(error) => unreadable(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use consensus_crds::{BackupSpec, S3CredentialsSecretRef, S3Destination, VolumeDestination};

    use super::*;

    fn s3_spec(prefix: Option<&str>) -> BackupSpec {
        BackupSpec {
            schedule: "@hourly".to_owned(),
            destination: BackupDestination {
                s3: Some(S3Destination {
                    bucket: "backups".to_owned(),
                    prefix: prefix.map(str::to_owned),
                    endpoint: Some("http://s3.local:9000".to_owned()),
                    region: "eu-west-1".to_owned(),
                    force_path_style: true,
                    credentials_secret: S3CredentialsSecretRef {
                        name: "s3".to_owned(),
                        access_key_id_key: "AWS_ACCESS_KEY_ID".to_owned(),
                        secret_access_key_key: "AWS_SECRET_ACCESS_KEY".to_owned(),
                    },
                }),
                volume: None,
            },
            retention: RetentionSpec { max_count: 3, max_age: Some("2d".to_owned()), tiered: true },
            suspend: false,
        }
    }

    fn run<'a>(spec: &'a BackupSpec, request: Option<&'a str>) -> BackupJob<'a> {
        BackupJob {
            backup: "locks-20261201T100000Z",
            slot: "2026-12-01T10:00:00Z".parse().expect("time"),
            attempt: 2,
            member: "locks-1",
            destination: &spec.destination,
            retention: request.is_none().then_some(&spec.retention),
            request,
        }
    }

    #[test]
    fn an_s3_destination_defaults_its_prefix_to_the_namespace_and_cluster() {
        let root = Path::new("/unused");
        let url = |spec: BackupSpec| destination_url(&spec.destination, "prod", "locks", root);
        assert_eq!(url(s3_spec(None)), "s3://backups/prod/locks");
        assert_eq!(url(s3_spec(Some("/team/a/"))), "s3://backups/team/a");
    }

    #[test]
    fn a_volume_destination_is_a_directory_on_the_mounted_volume() {
        let mut destination = BackupDestination {
            s3: None,
            volume: Some(VolumeDestination { claim_name: "keep".to_owned(), path: "/".to_owned() }),
        };
        assert_eq!(destination_url(&destination, "prod", "locks", Path::new("/backup")), "file:///backup");
        destination.volume.as_mut().expect("volume").path = "/locks/daily".to_owned();
        assert_eq!(
            destination_url(&destination, "prod", "locks", Path::new("/backup")),
            "file:///backup/locks/daily"
        );
    }

    #[test]
    fn the_command_carries_the_store_and_retention_but_no_credentials() {
        let spec = s3_spec(None);
        let line = command(&run(&spec, None), "http://m1:2379", "s3://b/p", "/report").join(" ");
        assert_eq!(
            line,
            "backup --endpoint http://m1:2379 --to s3://b/p --name locks-20261201T100000Z --report /report \
             --verify --s3-region eu-west-1 --s3-endpoint http://s3.local:9000 --s3-path-style --retain-count 3 \
             --retain-max-age-seconds 172800 --retain-tiered"
        );
        assert!(!line.contains("AWS_"), "{line}");
        // A backup asked for now deletes none: the schedule's retention decides.
        let line =
            command(&run(&spec, Some("before-upgrade")), "http://m1:2379", "s3://b/p", "/report").join(" ");
        assert!(line.ends_with("--s3-path-style"), "{line}");
    }

    #[test]
    fn job_names_fit_a_label_value_and_tell_schedule_from_request() {
        let spec = s3_spec(None);
        assert_eq!(run(&spec, None).job_name("locks"), "locks-backup-20261201100000-2");
        assert_eq!(run(&spec, Some("before-upgrade")).job_name("locks"), "before-upgrade-backup-2");
        let long = "a".repeat(70);
        for name in [run(&spec, None).job_name(&long), run(&spec, Some(&long)).job_name("locks")] {
            assert!(name.len() <= 63 && name.ends_with("-2"), "{name}");
        }
    }

    #[test]
    fn a_report_becomes_the_run_outcome() {
        let finished: Timestamp = "2026-12-01T10:00:05Z".parse().expect("time");
        let succeeded = r#"{"succeeded":{"manifest":{"name":"n","location":"s3://b/p/n.snapshot","sha256":"ab",
            "sizeBytes":4096,"revision":12,"hashKv":7,"compactRevision":0,"clusterId":"1","memberId":"2",
            "memberVersion":"3.5.0","taken":"2026-12-01T10:00:01Z"},"pruned":["old"]}}"#;
        let RunOutcome::Succeeded(taken) = outcome(succeeded, finished) else { panic!("not a success") };
        assert_eq!(
            (taken.revision, taken.size_bytes, taken.pruned.as_slice()),
            (12, 4096, &["old".to_owned()][..])
        );
        assert_eq!(taken.taken, "2026-12-01T10:00:01Z".parse::<Timestamp>().expect("time"));
        // Stored, but the restored scratch member did not hash as the cluster did: no good
        // backup.
        let unverified = succeeded
            .replace(r#""taken""#, r#""verified":false,"verification":"restored, it hashes to 1","taken""#);
        let RunOutcome::Failed { reason, .. } = outcome(&unverified, finished) else {
            panic!("counted as good")
        };
        assert!(reason.contains("failed verification: restored, it hashes to 1"), "{reason}");
        let failed = outcome(r#"{"failed":{"error":"s3://b/p cannot be listed: 403"}}"#, finished);
        assert_eq!(
            failed,
            RunOutcome::Failed { at: finished, reason: "s3://b/p cannot be listed: 403".to_owned() }
        );
        let RunOutcome::Failed { reason, .. } = outcome("{\"succ", finished) else { panic!("not a failure") };
        assert!(reason.contains("unreadable"), "{reason}");
    }
}
