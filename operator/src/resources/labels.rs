//! The labels every object of a cluster carries, and the subset that selects its members.

use std::collections::BTreeMap;

pub const NAME: &str = "app.kubernetes.io/name";
pub const INSTANCE: &str = "app.kubernetes.io/instance";
pub const COMPONENT: &str = "app.kubernetes.io/component";
pub const VERSION: &str = "app.kubernetes.io/version";
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";

/// `app.kubernetes.io/name` of every member: what runs in the pods, not who manages them.
pub const APP_NAME: &str = "consensus-node";
pub const MANAGER: &str = "consensus-operator";

/// Selects one cluster's members. Immutable in a StatefulSet, so it holds only what never
/// changes for the life of the cluster.
pub fn selector(cluster: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(NAME.to_owned(), APP_NAME.to_owned()), (INSTANCE.to_owned(), cluster.to_owned())])
}

/// The selector as `status.selector` carries it for the scale subresource.
pub fn selector_string(cluster: &str) -> String {
    as_selector(&selector(cluster))
}

/// `k=v,...`, as a label selector is written.
pub fn as_selector(labels: &BTreeMap<String, String>) -> String {
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// Labels of the pods that run for a cluster but are none of its members (backup and
/// recovery Jobs): `app` is never the members' name, so no Service, budget or spread
/// constraint of the members counts them.
pub fn run(app: &str, component: &str, cluster: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME.to_owned(), app.to_owned()),
        (INSTANCE.to_owned(), cluster.to_owned()),
        (COMPONENT.to_owned(), component.to_owned()),
        (MANAGED_BY.to_owned(), MANAGER.to_owned()),
    ])
}

/// Selector labels plus the descriptive ones.
pub fn common(cluster: &str, version: Option<&str>) -> BTreeMap<String, String> {
    let mut labels = selector(cluster);
    labels.insert(COMPONENT.to_owned(), "member".to_owned());
    labels.insert(MANAGED_BY.to_owned(), MANAGER.to_owned());
    if let Some(version) = version {
        labels.insert(VERSION.to_owned(), version.to_owned());
    }
    labels
}

/// Member pod labels: the user's extra labels, then ours, so a user label can never
/// take a pod out of its own selector.
pub fn pod(
    cluster: &str,
    version: Option<&str>,
    extra: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut labels = extra.clone();
    labels.extend(common(cluster, version));
    labels
}
