//! What the operator scenarios share: the operator deployed once as users deploy it, a
//! ConsensusCluster in a namespace of its own, the pods and nodes as the API server reports
//! them, the operator's metrics, and each scenario's time.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::{TestNamespace, kubectl, kubectl_json, kubectl_ok, repo_root, wait_until};

/// Where `kubectl apply -k manifests/` puts the operator.
pub const OPERATOR_NAMESPACE: &str = "consensus-system";
pub const OPERATOR_LABEL: &str = "app.kubernetes.io/name=consensus-operator";
/// Debug-free release images on two shared cores: a cluster forms in seconds, but the
/// machine also runs the control plane and six kubelets.
pub const DEADLINE: Duration = Duration::from_secs(240);

/// Prints how long the scenario took when it ends, pass or fail (`make e2e` shows it).
pub struct Timer {
    name: &'static str,
    started: Instant,
}

impl Timer {
    pub fn start(name: &'static str) -> Self {
        eprintln!("scenario {name}: started");
        Self { name, started: Instant::now() }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        let outcome = if std::thread::panicking() { "FAILED" } else { "passed" };
        eprintln!("scenario {}: {outcome} in {:.1} s", self.name, self.started.elapsed().as_secs_f64());
    }
}

/// A pod as the API server reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub name: String,
    pub uid: String,
    pub ip: String,
    pub node: String,
    pub ready: bool,
}

/// The pods of `namespace` that `selector` matches, by name.
pub fn pods(namespace: &str, selector: &str) -> Vec<PodInfo> {
    let listed = kubectl_json(&["-n", namespace, "get", "pods", "-l", selector]);
    let text = |value: &serde_json::Value| value.as_str().unwrap_or_default().to_owned();
    let mut pods: Vec<PodInfo> = listed["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|pod| pod["metadata"]["deletionTimestamp"].is_null())
        .map(|pod| PodInfo {
            name: text(&pod["metadata"]["name"]),
            uid: text(&pod["metadata"]["uid"]),
            ip: text(&pod["status"]["podIP"]),
            node: text(&pod["spec"]["nodeName"]),
            ready: pod["status"]["conditions"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True")),
        })
        .collect();
    pods.sort_by(|a, b| a.name.cmp(&b.name));
    pods
}

/// The zone label of every node.
pub fn node_zones() -> BTreeMap<String, String> {
    let nodes = kubectl_json(&["get", "nodes"]);
    nodes["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|node| {
            let name = node["metadata"]["name"].as_str().unwrap_or_default().to_owned();
            let zone = node["metadata"]["labels"]["topology.kubernetes.io/zone"].as_str().unwrap_or_default();
            (name, zone.to_owned())
        })
        .collect()
}

/// The operator as users deploy it (`kubectl apply --server-side -k manifests/`), once per
/// test binary: both replicas ready, one holding the Lease. Returns the holder's pod name.
pub fn deploy_operator() -> String {
    static DEPLOYED: OnceLock<()> = OnceLock::new();
    DEPLOYED.get_or_init(|| {
        let manifests = repo_root().join("manifests");
        kubectl_ok(&["apply", "--server-side", "-k", &manifests.to_string_lossy()], None);
        kubectl_ok(
            &["wait", "--for=condition=Established", "crd/consensusclusters.consensus.dev", "--timeout=60s"],
            None,
        );
        kubectl_ok(
            &[
                "-n",
                OPERATOR_NAMESPACE,
                "rollout",
                "status",
                "deployment/consensus-operator",
                "--timeout=240s",
            ],
            None,
        );
    });
    wait_for_lease_holder(None)
}

/// The operator pod holding the Lease, once it is a ready pod other than `not`.
pub fn wait_for_lease_holder(not: Option<&str>) -> String {
    wait_until(DEADLINE, "an operator replica to hold the Lease", || {
        let holder = lease_holder()?;
        let ready = pods(OPERATOR_NAMESPACE, OPERATOR_LABEL).into_iter().any(|p| p.name == holder && p.ready);
        (ready && Some(holder.as_str()) != not).then_some(holder)
    })
}

pub fn lease_holder() -> Option<String> {
    let out = kubectl(
        &[
            "-n",
            OPERATOR_NAMESPACE,
            "get",
            "lease",
            "consensus-operator",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ],
        None,
    );
    (out.ok && !out.stdout.is_empty()).then_some(out.stdout)
}

/// `GET path` on `address` (host:port) over plain HTTP/1.1: the body, if the answer is 200.
pub fn http_get(address: &str, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// The value of the Prometheus sample `name` (with its labels, as exposed) summed over every
/// series whose name and labels start with `series`.
pub fn metric_sum(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#') && line.starts_with(series))
        .filter_map(|line| line.rsplit_once(' ').and_then(|(_, value)| value.parse::<f64>().ok()))
        .sum()
}

/// An address of this machine that pods reach: the pod bridge's own address on the local
/// control plane (hack/cluster-net.sh); elsewhere `E2E_POD_REACHABLE_ADDRESS` (on kind, the
/// Docker network's gateway, often 172.18.0.1).
pub fn pod_reachable_address() -> std::net::IpAddr {
    let address = std::env::var("E2E_POD_REACHABLE_ADDRESS").unwrap_or_else(|_| "10.244.0.1".to_owned());
    address.parse().unwrap_or_else(|e| panic!("E2E_POD_REACHABLE_ADDRESS {address:?}: {e}"))
}

/// A ConsensusCluster named `name` in a test namespace, which goes with the last cluster in it.
pub struct Cluster {
    pub namespace: Arc<TestNamespace>,
    pub name: String,
}

impl Cluster {
    /// Applies `spec` (the YAML under `spec:`, indented by two) as `name` in a new namespace.
    pub fn create(prefix: &str, name: &str, spec: &str) -> Self {
        let cluster = Self::in_namespace(TestNamespace::create(prefix), name);
        cluster.apply(spec);
        cluster
    }

    pub fn in_namespace(namespace: TestNamespace, name: &str) -> Self {
        Self { namespace: Arc::new(namespace), name: name.to_owned() }
    }

    /// Another cluster, `name`, in the same namespace (not applied yet).
    pub fn sibling(&self, name: &str) -> Self {
        Self { namespace: self.namespace.clone(), name: name.to_owned() }
    }

    pub fn ns(&self) -> &str {
        &self.namespace.0
    }

    pub fn apply(&self, spec: &str) {
        let manifest = format!(
            "apiVersion: consensus.dev/v1alpha1\nkind: ConsensusCluster\nmetadata:\n  name: {}\nspec:\n{spec}",
            self.name
        );
        kubectl_ok(&["-n", self.ns(), "apply", "-f", "-"], Some(&manifest));
    }

    /// `kubectl <args> -n <ns>`, panicking with its output when it fails.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.ns()];
        all.extend(args);
        kubectl_ok(&all, None)
    }

    pub fn resource(&self) -> serde_json::Value {
        kubectl_json(&["-n", self.ns(), "get", "cc", &self.name])
    }

    pub fn status(&self) -> serde_json::Value {
        self.resource()["status"].clone()
    }

    /// The member pods (the cluster's selector labels).
    pub fn pods(&self) -> Vec<PodInfo> {
        // Backup and recovery runs carry the instance label too, never the members' name.
        pods(
            self.ns(),
            &format!("app.kubernetes.io/name=consensus-node,app.kubernetes.io/instance={}", self.name),
        )
    }

    /// The client endpoint of each member pod, by pod name.
    pub fn endpoints(&self) -> BTreeMap<String, String> {
        self.pods()
            .into_iter()
            .filter(|p| !p.ip.is_empty())
            .map(|p| (p.name, format!("http://{}:2379", p.ip)))
            .collect()
    }

    /// Waits until the status reports `voters` healthy voters, no learner, a leader, phase
    /// Running and `voters` ready replicas; returns that status.
    pub fn wait_running(&self, voters: usize) -> serde_json::Value {
        wait_until(
            DEADLINE,
            &format!("{}/{} Running with {voters} healthy voters", self.ns(), self.name),
            || {
                let status = self.status();
                let members = status["members"].as_array()?;
                let healthy_voters =
                    members.iter().filter(|m| m["healthy"] == true && m["role"] != "Learner").count();
                let running = status["phase"] == "Running"
                    && status["readyReplicas"] == voters
                    && members.len() == voters
                    && healthy_voters == voters
                    && status["leader"].is_string();
                running.then_some(status)
            },
        )
    }

    /// The condition `type` of the status: (status, reason, message).
    pub fn condition(&self, type_: &str) -> Option<(String, String, String)> {
        condition(&self.status(), type_)
    }

    /// The Events about the ConsensusCluster, as `reason: message` lines, oldest first.
    pub fn events(&self) -> Vec<String> {
        events_about(self.ns(), "ConsensusCluster", &self.name)
    }
}

/// The Events about the object `kind/name` in `namespace`, as `reason: message` lines,
/// oldest first.
pub fn events_about(namespace: &str, kind: &str, name: &str) -> Vec<String> {
    let events = kubectl_json(&[
        "-n",
        namespace,
        "get",
        "events",
        "--field-selector",
        &format!("involvedObject.kind={kind},involvedObject.name={name}"),
        "--sort-by=.metadata.creationTimestamp",
    ]);
    events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| format!("{}: {}", e["reason"].as_str().unwrap_or(""), e["message"].as_str().unwrap_or("")))
        .collect()
}

/// The condition `type_` of `status`: (status, reason, message).
pub fn condition(status: &serde_json::Value, type_: &str) -> Option<(String, String, String)> {
    let found = status["conditions"].as_array()?.iter().find(|c| c["type"] == type_)?;
    let text = |key: &str| found[key].as_str().unwrap_or_default().to_owned();
    Some((text("status"), text("reason"), text("message")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sums_add_every_series_of_a_name_and_skip_comments() {
        let exposition = "# HELP consensus_operator_reconciles_total Reconciles.\n\
            # TYPE consensus_operator_reconciles_total counter\n\
            consensus_operator_reconciles_total{outcome=\"ok\"} 7\n\
            consensus_operator_reconciles_total{outcome=\"error\"} 2\n\
            consensus_operator_reconcile_duration_seconds_count 9\n";
        assert_eq!(metric_sum(exposition, "consensus_operator_reconciles_total"), 9.0);
        assert_eq!(metric_sum(exposition, "consensus_operator_reconciles_total{outcome=\"ok\"}"), 7.0);
        assert_eq!(metric_sum(exposition, "absent_total"), 0.0);
    }

    #[test]
    fn a_condition_is_found_by_type() {
        let status = serde_json::json!({"conditions": [
            {"type": "Available", "status": "True", "reason": "QuorumHealthy", "message": "leader demo-1"},
        ]});
        assert_eq!(
            condition(&status, "Available"),
            Some(("True".into(), "QuorumHealthy".into(), "leader demo-1".into()))
        );
        assert_eq!(condition(&status, "Degraded"), None);
    }
}
