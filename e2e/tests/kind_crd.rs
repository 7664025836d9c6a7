//! The ConsensusCluster API on a real API server: CEL rules, defaults and the scale
//! subresource, checked by the server itself. Needs no operator.

use consensus_e2e::{TestNamespace, kubectl, kubectl_ok, repo_root};

fn install_crd() {
    let crd = repo_root().join("manifests/crds/consensus.dev_consensusclusters.yaml");
    kubectl_ok(&["apply", "--server-side", "-f", &crd.to_string_lossy()], None);
    kubectl_ok(
        &["wait", "--for=condition=Established", "crd/consensusclusters.consensus.dev", "--timeout=60s"],
        None,
    );
}

fn cluster(name: &str, replicas: i64) -> String {
    format!(
        "apiVersion: consensus.dev/v1alpha1\nkind: ConsensusCluster\nmetadata:\n  name: {name}\nspec:\n  replicas: {replicas}\n"
    )
}

#[test]
#[ignore = "needs a Kubernetes cluster: make e2e"]
fn api_server_enforces_odd_member_counts_and_applies_defaults() {
    install_crd();
    let ns = TestNamespace::create("cc-api");
    for n in [0, 2, 4, 10, -1] {
        let out = kubectl(&["-n", &ns.0, "apply", "-f", "-"], Some(&cluster("bad", n)));
        assert!(!out.ok, "replicas {n} was accepted");
        assert!(out.stderr.contains("odd number between 1 and 9"), "replicas {n}: {}", out.stderr);
    }
    let created = kubectl_ok(
        &["-n", &ns.0, "create", "-o", "json", "-f", "-"],
        Some(
            "apiVersion: consensus.dev/v1alpha1\nkind: ConsensusCluster\nmetadata:\n  name: demo\nspec: {}\n",
        ),
    );
    let object: serde_json::Value = serde_json::from_str(&created).expect("kubectl prints JSON");
    assert_eq!(object["spec"]["replicas"], 3);
    assert_eq!(object["spec"]["placement"]["zoneTopologyKey"], "topology.kubernetes.io/zone");
}

#[test]
#[ignore = "needs a Kubernetes cluster: make e2e"]
fn kubectl_scale_goes_through_the_scale_subresource() {
    install_crd();
    let ns = TestNamespace::create("cc-scale");
    kubectl_ok(&["-n", &ns.0, "apply", "-f", "-"], Some(&cluster("demo", 3)));
    kubectl_ok(&["-n", &ns.0, "scale", "cc/demo", "--replicas=5"], None);
    let replicas = kubectl_ok(&["-n", &ns.0, "get", "cc/demo", "-o", "jsonpath={.spec.replicas}"], None);
    assert_eq!(replicas, "5");
    let refused = kubectl(&["-n", &ns.0, "scale", "cc/demo", "--replicas=4"], None);
    assert!(!refused.ok, "scaling to 4 was accepted");
}

#[test]
#[ignore = "needs a Kubernetes cluster: make e2e"]
fn every_sample_is_accepted_by_the_api_server() {
    install_crd();
    let ns = TestNamespace::create("cc-samples");
    let samples = repo_root().join("manifests/samples");
    for name in ["three-members.yaml", "five-members-zones.yaml", "s3-backups.yaml"] {
        let path = samples.join(name);
        kubectl_ok(&["-n", &ns.0, "apply", "--dry-run=server", "-f", &path.to_string_lossy()], None);
    }
}
