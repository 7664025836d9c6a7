//! Operator metrics on `/metrics`: reconciles, their durations, errors by reason, and
//! clusters by phase.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use consensus_crds::{BackupRecord, Phase};
use k8s_openapi::jiff::Timestamp;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::plan::backup::{BackupRun, RunOutcome, failure_kind};

fn seconds_between(from: Timestamp, to: Timestamp) -> f64 {
    to.duration_since(from).as_secs_f64().max(0.0)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabels {
    cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackupFailureLabels {
    cluster: String,
    reason: String,
}

const PHASES: [Phase; 8] = [
    Phase::Pending,
    Phase::Bootstrapping,
    Phase::Running,
    Phase::Scaling,
    Phase::Updating,
    Phase::Degraded,
    Phase::QuorumLost,
    Phase::Restoring,
];

fn phase_name(phase: Phase) -> String {
    format!("{phase:?}")
}

pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    durations: Histogram,
    errors: Family<ReasonLabels, Counter>,
    clusters: Family<PhaseLabels, Gauge>,
    backup_last_success: Family<ClusterLabels, Gauge>,
    backup_size: Family<ClusterLabels, Gauge>,
    backup_durations: Histogram,
    backup_failures: Family<BackupFailureLabels, Counter>,
    quorum_lost_since: Family<ClusterLabels, Gauge>,
    /// Phase of each cluster, by `namespace/name`; the gauge is recomputed from it so a
    /// cluster moving between phases is never counted twice.
    phases: Mutex<BTreeMap<String, Phase>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("consensus_operator");
        let reconciles = Counter::default();
        // 1 ms to ~16 s: a reconcile is a few API calls plus, at worst, member probes timing out.
        let durations = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let errors = Family::<ReasonLabels, Counter>::default();
        let clusters = Family::<PhaseLabels, Gauge>::default();
        registry.register("reconciles", "Reconciles started", reconciles.clone());
        registry.register("reconcile_duration_seconds", "Time spent in one reconcile", durations.clone());
        registry.register("reconcile_errors", "Failed reconciles, by reason", errors.clone());
        registry.register("clusters", "ConsensusClusters, by phase", clusters.clone());
        let backup_last_success = Family::<ClusterLabels, Gauge>::default();
        let backup_size = Family::<ClusterLabels, Gauge>::default();
        // 0.5 s to ~68 min: a small store takes seconds, a run is stopped at 10 minutes.
        let backup_durations = Histogram::new(exponential_buckets(0.5, 2.0, 14));
        let backup_failures = Family::<BackupFailureLabels, Counter>::default();
        registry.register(
            "backup_last_success_timestamp_seconds",
            "When the newest verified backup of a cluster was taken (Unix time)",
            backup_last_success.clone(),
        );
        registry.register(
            "backup_size_bytes",
            "Size of the newest verified backup of a cluster",
            backup_size.clone(),
        );
        registry.register(
            "backup_duration_seconds",
            "Time a backup run took, from its start to its end",
            backup_durations.clone(),
        );
        registry.register(
            "backup_failures",
            "Backup runs that failed, by cluster and cause (backup::failure_kind)",
            backup_failures.clone(),
        );
        let quorum_lost_since = Family::<ClusterLabels, Gauge>::default();
        registry.register(
            "quorum_lost_since_timestamp_seconds",
            "When a cluster without quorum lost it (Unix time); absent while it has quorum",
            quorum_lost_since.clone(),
        );
        // Every phase is present from the start, so a query for one never comes back empty.
        for phase in PHASES {
            clusters.get_or_create(&PhaseLabels { phase: phase_name(phase) }).set(0);
        }
        Self {
            registry,
            reconciles,
            durations,
            errors,
            clusters,
            backup_last_success,
            backup_size,
            backup_durations,
            backup_failures,
            quorum_lost_since,
            phases: Mutex::default(),
        }
    }
}

impl Metrics {
    pub fn shared() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn reconciled(&self, took: Duration, error: Option<&'static str>) {
        self.reconciles.inc();
        self.durations.observe(took.as_secs_f64());
        if let Some(reason) = error {
            self.errors.get_or_create(&ReasonLabels { reason: reason.to_owned() }).inc();
        }
    }

    /// `None` when the cluster is gone.
    pub fn set_phase(&self, cluster: &str, phase: Option<Phase>) {
        let Ok(mut phases) = self.phases.lock() else { return };
        match phase {
            Some(phase) => phases.insert(cluster.to_owned(), phase),
            None => phases.remove(cluster),
        };
        for each in PHASES {
            let count = phases.values().filter(|&&p| p == each).count();
            let labels = PhaseLabels { phase: phase_name(each) };
            self.clusters.get_or_create(&labels).set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    /// When `cluster` lost its quorum as its status says, `None` while it has one (or is
    /// gone): the series is there exactly while the quorum is lost, for alerts to key on.
    pub fn set_quorum_lost(&self, cluster: &str, since: Option<k8s_openapi::jiff::Timestamp>) {
        let labels = ClusterLabels { cluster: cluster.to_owned() };
        match since {
            Some(since) => {
                self.quorum_lost_since.get_or_create(&labels).set(since.as_second());
            }
            None => {
                self.quorum_lost_since.remove(&labels);
            }
        }
    }

    /// The newest verified backup of `cluster` as its status records it: set on every
    /// reconcile, so a restarted operator or a standby that takes over reports it at once.
    pub fn set_last_backup(&self, cluster: &str, last: Option<&BackupRecord>) {
        let labels = ClusterLabels { cluster: cluster.to_owned() };
        if let Some(last) = last {
            self.backup_last_success.get_or_create(&labels).set(last.time.0.as_second());
            self.backup_size.get_or_create(&labels).set(last.size_bytes);
        }
    }

    /// A backup run of `cluster` that has just ended: its duration, and its cause when it
    /// failed.
    pub fn backup_ended(&self, cluster: &str, run: &BackupRun) {
        match &run.outcome {
            RunOutcome::Running => {}
            RunOutcome::Succeeded(taken) => {
                self.backup_durations.observe(seconds_between(run.started, taken.finished));
            }
            RunOutcome::Failed { at, reason } => {
                self.backup_durations.observe(seconds_between(run.started, *at));
                let labels = BackupFailureLabels {
                    cluster: cluster.to_owned(),
                    reason: failure_kind(reason).to_owned(),
                };
                self.backup_failures.get_or_create(&labels).inc();
            }
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clusters_are_counted_once_in_their_latest_phase() {
        let metrics = Metrics::default();
        metrics.set_phase("a/one", Some(Phase::Pending));
        metrics.set_phase("a/one", Some(Phase::Running));
        metrics.set_phase("a/two", Some(Phase::Running));
        metrics.reconciled(Duration::from_millis(3), Some("kube_api"));
        let text = metrics.render();
        assert!(text.contains(r#"consensus_operator_clusters{phase="Running"} 2"#), "{text}");
        assert!(text.contains(r#"consensus_operator_clusters{phase="Pending"} 0"#), "{text}");
        assert!(text.contains(r#"consensus_operator_reconcile_errors_total{reason="kube_api"} 1"#), "{text}");
        assert!(text.contains("consensus_operator_reconciles_total 1"), "{text}");
        metrics.set_phase("a/two", None);
        assert!(metrics.render().contains(r#"consensus_operator_clusters{phase="Running"} 1"#));
        metrics.set_phase("a/one", Some(Phase::Updating));
        assert!(metrics.render().contains(r#"consensus_operator_clusters{phase="Updating"} 1"#));
    }

    #[test]
    fn a_quorum_loss_is_a_series_while_it_lasts() {
        let metrics = Metrics::default();
        let since: k8s_openapi::jiff::Timestamp = "2026-12-01T10:05:00Z".parse().expect("time");
        metrics.set_quorum_lost("a/one", Some(since));
        let text = metrics.render();
        let series = r#"consensus_operator_quorum_lost_since_timestamp_seconds{cluster="a/one"} 1796119500"#;
        assert!(text.contains(series), "{text}");
        metrics.set_quorum_lost("a/one", None);
        assert!(!metrics.render().contains(r#"quorum_lost_since_timestamp_seconds{cluster="a/one"}"#));
    }

    #[test]
    fn a_backup_that_ended_is_counted_by_outcome_and_cause() {
        let metrics = Metrics::default();
        let t = |text: &str| -> Timestamp { text.parse().expect("time") };
        let run = |outcome| BackupRun {
            request: None,
            backup: "demo-20261201T100000Z".to_owned(),
            slot: t("2026-12-01T10:00:00Z"),
            attempt: 1,
            member: "demo-1".to_owned(),
            started: t("2026-12-01T10:00:01Z"),
            outcome,
        };
        metrics.backup_ended(
            "ns/demo",
            &run(RunOutcome::Failed {
                at: t("2026-12-01T10:00:03Z"),
                reason: "s3://b cannot be listed".to_owned(),
            }),
        );
        let succeeded = run(RunOutcome::Succeeded(Box::new(crate::plan::backup::Taken {
            location: "s3://b/p/n.snapshot".to_owned(),
            sha256: "ab".to_owned(),
            size_bytes: 4096,
            revision: 9,
            taken: t("2026-12-01T10:00:02Z"),
            pruned: Vec::new(),
            verified: Some(true),
            finished: t("2026-12-01T10:00:05Z"),
        })));
        metrics.backup_ended("ns/demo", &succeeded);
        let record = BackupRecord {
            name: succeeded.backup.clone(),
            time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t("2026-12-01T10:00:02Z")),
            location: "s3://b/p/n.snapshot".to_owned(),
            revision: 9,
            size_bytes: 4096,
            sha256: "ab".to_owned(),
            verified: Some(true),
        };
        metrics.set_last_backup("ns/demo", Some(&record));
        let text = metrics.render();
        for expected in [
            r#"consensus_operator_backup_failures_total{cluster="ns/demo",reason="destination"} 1"#,
            r#"consensus_operator_backup_size_bytes{cluster="ns/demo"} 4096"#,
            r#"consensus_operator_backup_last_success_timestamp_seconds{cluster="ns/demo"} 1796119202"#,
            "consensus_operator_backup_duration_seconds_count 2",
            "consensus_operator_backup_duration_seconds_sum 6.0",
        ] {
            assert!(text.contains(expected), "{expected} not in\n{text}");
        }
    }
}
