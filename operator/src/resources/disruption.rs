use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Cluster, labels};

/// Members a voluntary disruption (drain, eviction) may take at once without costing
/// quorum: replicas minus quorum. A single member has none to spare, so draining its node
/// waits for the user to decide.
pub fn max_unavailable(replicas: i32) -> i32 {
    (replicas.max(1) - 1) / 2
}

pub(super) fn budget(cluster: &Cluster<'_>, replicas: i32) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: cluster.metadata(cluster.name.to_owned()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(max_unavailable(replicas))),
            selector: Some(LabelSelector {
                match_labels: Some(labels::selector(cluster.name)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

#[cfg(test)]
mod tests {
    use super::max_unavailable;

    #[test]
    fn a_voluntary_disruption_never_costs_quorum() {
        for replicas in 1..=9 {
            let quorum = replicas / 2 + 1;
            assert!(replicas - max_unavailable(replicas) >= quorum, "{replicas}");
        }
        assert_eq!([1, 3, 5, 7, 9].map(max_unavailable), [0, 1, 2, 3, 4]);
    }
}
