//! The member configuration that may change while members run: who the initial members
//! are and whether they bootstrap or join. Kept in a ConfigMap read through environment
//! variables, so changing it never changes the pod template and so never rolls every
//! member at once; a member reads it when it starts, which is the only time it matters.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;

use super::{Cluster, Members, peer_url};

pub const INITIAL_CLUSTER_KEY: &str = "initial-cluster";
pub const INITIAL_CLUSTER_STATE_KEY: &str = "initial-cluster-state";

/// `new` only while the cluster bootstraps: a member started later with `new` and an empty
/// volume would found a second cluster instead of joining the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitialClusterState {
    New,
    Existing,
}

impl InitialClusterState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Existing => "existing",
        }
    }
}

pub(super) fn config_map(cluster: &Cluster<'_>, members: Members) -> ConfigMap {
    let initial_cluster = (0..members.replicas)
        .map(|i| {
            let member = cluster.member_name(i);
            format!("{member}={}", peer_url(cluster.name, cluster.namespace, &member))
        })
        .collect::<Vec<_>>()
        .join(",");
    ConfigMap {
        metadata: cluster.metadata(cluster.config_map_name()),
        data: Some(BTreeMap::from([
            (INITIAL_CLUSTER_KEY.to_owned(), initial_cluster),
            (INITIAL_CLUSTER_STATE_KEY.to_owned(), members.state.as_str().to_owned()),
        ])),
        ..ConfigMap::default()
    }
}
