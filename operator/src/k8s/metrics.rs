//! Operator metrics on `/metrics`: reconciles, their durations, errors by reason, and
//! clusters by phase.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use consensus_crds::Phase;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

const PHASES: [Phase; 7] = [
    Phase::Pending,
    Phase::Bootstrapping,
    Phase::Running,
    Phase::Scaling,
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
        // Every phase is present from the start, so a query for one never comes back empty.
        for phase in PHASES {
            clusters.get_or_create(&PhaseLabels { phase: phase_name(phase) }).set(0);
        }
        Self { registry, reconciles, durations, errors, clusters, phases: Mutex::default() }
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
    }
}
