//! The cluster the other scenarios run on, checked for what they rely on: a server of
//! Kubernetes 1.34 or newer, nodes in three zones, and the repository's manifests accepted
//! by both kinds of `kubectl apply`.

use std::collections::BTreeSet;

use consensus_e2e::{kubectl, kubectl_json, kubectl_ok, repo_root};

#[test]
#[ignore = "needs a Kubernetes cluster: make e2e"]
fn the_server_is_kubernetes_1_34_or_newer() {
    let version = kubectl_json(&["version"]);
    let server = &version["serverVersion"];
    let major: u32 = server["major"].as_str().and_then(|m| m.parse().ok()).expect("server major version");
    let minor: u32 = server["minor"]
        .as_str()
        .and_then(|m| m.trim_end_matches('+').parse().ok())
        .expect("server minor version");
    assert!((major, minor) >= (1, 34), "server is {}", server["gitVersion"]);
}

#[test]
#[ignore = "needs a Kubernetes cluster: make e2e"]
fn nodes_are_ready_in_three_zones() {
    let nodes = kubectl_json(&["get", "nodes"]);
    let items = nodes["items"].as_array().expect("a node list");
    let ready_zones: BTreeSet<&str> = items
        .iter()
        .filter(|node| {
            node["status"]["conditions"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
        })
        .filter_map(|node| node["metadata"]["labels"]["topology.kubernetes.io/zone"].as_str())
        .collect();
    assert!(ready_zones.len() >= 3, "ready nodes span zones {ready_zones:?}");
}

#[test]
#[ignore = "needs a Kubernetes cluster: make e2e"]
fn the_manifests_apply_client_side_and_server_side() {
    let base = repo_root().join("manifests");
    let base = base.to_string_lossy();
    kubectl_ok(&["apply", "-k", &base], None);
    kubectl_ok(&["apply", "--server-side", "-k", &base], None);
    let deployment = kubectl_json(&["-n", "consensus-system", "get", "deployment", "consensus-operator"]);
    assert_eq!(deployment["spec"]["replicas"], 2);
    // The operator itself is proven by its own scenarios; these objects go again so that it
    // does not act on the clusters other scenarios make.
    let _ = kubectl(&["delete", "-k", &base, "--wait=true", "--timeout=120s"], None);
}
