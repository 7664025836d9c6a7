//! The Node object: registration, its status (conditions, capacity, addresses, versions)
//! and the heartbeat Lease in kube-node-lease. Everything goes through the node's own
//! identity, which the Node authorizer and NodeRestriction limit to this Node and Lease.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeSpec, NodeStatus,
    NodeSystemInfo,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};

pub const LEASE_NAMESPACE: &str = "kube-node-lease";
pub const LEASE_DURATION_SECONDS: i32 = 40;

/// What the Node says about itself.
#[derive(Debug, Clone)]
pub struct Facts {
    pub name: String,
    pub zone: String,
    pub pod_cidr: String,
    pub internal_ip: String,
    pub port: u16,
    pub kubelet_version: String,
    pub runtime_version: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub max_pods: u32,
    pub ephemeral_bytes: u64,
}

pub fn labels(f: &Facts) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("kubernetes.io/hostname".to_owned(), f.name.clone()),
        ("topology.kubernetes.io/zone".to_owned(), f.zone.clone()),
        ("topology.kubernetes.io/region".to_owned(), "local".to_owned()),
        ("kubernetes.io/os".to_owned(), "linux".to_owned()),
        ("kubernetes.io/arch".to_owned(), "amd64".to_owned()),
    ])
}

pub fn new_node(f: &Facts) -> Node {
    Node {
        metadata: ObjectMeta { name: Some(f.name.clone()), labels: Some(labels(f)), ..ObjectMeta::default() },
        spec: Some(NodeSpec {
            pod_cidr: Some(f.pod_cidr.clone()),
            pod_cidrs: Some(vec![f.pod_cidr.clone()]),
            ..NodeSpec::default()
        }),
        status: None,
    }
}

fn resources(f: &Facts) -> BTreeMap<String, Quantity> {
    BTreeMap::from([
        ("cpu".to_owned(), Quantity(f.cpus.to_string())),
        ("memory".to_owned(), Quantity(format!("{}Ki", f.memory_bytes / 1024))),
        ("pods".to_owned(), Quantity(f.max_pods.to_string())),
        ("ephemeral-storage".to_owned(), Quantity(format!("{}Ki", f.ephemeral_bytes / 1024))),
    ])
}

/// The status the kubelet reports; `previous` keeps transition times of unchanged conditions.
pub fn node_status(f: &Facts, previous: Option<&NodeStatus>, now: Timestamp) -> NodeStatus {
    let prev: Vec<NodeCondition> = previous.and_then(|s| s.conditions.clone()).unwrap_or_default();
    let cond = |type_: &str, status: &str, reason: &str, message: &str| {
        let transition = prev
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or(Time(now));
        NodeCondition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: Some(reason.to_owned()),
            message: Some(message.to_owned()),
            last_heartbeat_time: Some(Time(now)),
            last_transition_time: Some(transition),
        }
    };
    NodeStatus {
        capacity: Some(resources(f)),
        allocatable: Some(resources(f)),
        conditions: Some(vec![
            cond(
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "kubelet has sufficient memory available",
            ),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            cond("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
        ]),
        addresses: Some(vec![
            NodeAddress { type_: "InternalIP".into(), address: f.internal_ip.clone() },
            NodeAddress { type_: "Hostname".into(), address: f.name.clone() },
        ]),
        daemon_endpoints: Some(NodeDaemonEndpoints {
            kubelet_endpoint: Some(DaemonEndpoint { port: f.port as i32 }),
        }),
        node_info: Some(NodeSystemInfo {
            architecture: "amd64".into(),
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            container_runtime_version: f.runtime_version.clone(),
            kernel_version: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            kube_proxy_version: String::new(),
            kubelet_version: f.kubelet_version.clone(),
            machine_id: std::fs::read_to_string("/etc/machine-id")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            operating_system: "linux".into(),
            os_image: os_image(),
            system_uuid: String::new(),
            swap: None,
        }),
        ..NodeStatus::default()
    }
}

fn os_image() -> String {
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_owned()))
        })
        .unwrap_or_else(|| "Linux".to_owned())
}

/// Creates the Node if absent (labels and podCIDR), then writes its status.
pub async fn register(client: &Client, f: &Facts) -> Result<Node> {
    let api: Api<Node> = Api::all(client.clone());
    let node = match api.get_opt(&f.name).await.context("reading own Node")? {
        Some(n) => {
            // Labels the kubelet owns are put back (a previous run may have had another zone).
            let patch = serde_json::json!({ "metadata": { "labels": labels(f) } });
            api.patch(&f.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .context("labelling own Node")?;
            n
        }
        None => api.create(&PostParams::default(), &new_node(f)).await.context("registering Node")?,
    };
    update_status(client, f, node.status.as_ref()).await
}

pub async fn update_status(client: &Client, f: &Facts, previous: Option<&NodeStatus>) -> Result<Node> {
    let api: Api<Node> = Api::all(client.clone());
    let status = node_status(f, previous, Timestamp::now());
    let patch = serde_json::json!({ "status": status });
    api.patch_status(&f.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .context("patching Node status")
}

/// Renews (or creates) the node's Lease.
pub async fn renew_lease(client: &Client, node: &Node) -> Result<()> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let api: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let now = MicroTime(Timestamp::now());
    let spec = LeaseSpec {
        holder_identity: Some(name.clone()),
        lease_duration_seconds: Some(LEASE_DURATION_SECONDS),
        renew_time: Some(now),
        ..LeaseSpec::default()
    };
    match api.get_opt(&name).await? {
        Some(mut lease) => {
            lease.spec = Some(spec);
            api.replace(&name, &PostParams::default(), &lease).await?;
        }
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(LEASE_NAMESPACE.into()),
                    // Deleted with the Node, as the kubelet's.
                    owner_references: node.metadata.uid.clone().map(|uid| {
                        vec![OwnerReference {
                            api_version: "v1".into(),
                            kind: "Node".into(),
                            name: name.clone(),
                            uid,
                            ..OwnerReference::default()
                        }]
                    }),
                    ..ObjectMeta::default()
                },
                spec: Some(spec),
            };
            api.create(&PostParams::default(), &lease).await?;
        }
    }
    Ok(())
}

/// Heartbeats: the Lease every 10 s, the status every minute; re-registers a deleted Node.
pub async fn heartbeat(client: Client, facts: Facts, mut node: Node) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        if let Err(e) = renew_lease(&client, &node).await {
            tracing::warn!(error = %format!("{e:#}"), "renewing node lease");
        }
        n += 1;
        if n.is_multiple_of(6) {
            let result = match update_status(&client, &facts, node.status.as_ref()).await {
                Err(e) if is_not_found(&e) => register(&client, &facts).await,
                other => other,
            };
            match result {
                Ok(fresh) => node = fresh,
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "updating node status"),
            }
        }
    }
}

fn is_not_found(e: &anyhow::Error) -> bool {
    e.chain().any(|c| matches!(c.downcast_ref::<kube::Error>(), Some(kube::Error::Api(s)) if s.code == 404))
}

/// CPUs, memory and the disk under `dir`, as capacity.
pub fn machine(dir: &std::path::Path) -> (u32, u64, u64) {
    let cpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("MemTotal:")
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
        })
        .map(|kb| kb * 1024)
        .unwrap_or(8 << 30);
    let disk = statvfs_bytes(dir).unwrap_or(100 << 30);
    (cpus, mem, disk)
}

fn statvfs_bytes(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes only the struct it is given; c is a valid C string.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    (rc == 0).then(|| s.f_blocks as u64 * s.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            name: "node-2".into(),
            zone: "zone-b".into(),
            pod_cidr: "10.244.2.0/24".into(),
            internal_ip: "10.244.0.1".into(),
            port: 10252,
            kubelet_version: "v1.34.4".into(),
            runtime_version: "podman://4.3.1".into(),
            cpus: 2,
            memory_bytes: 24 << 30,
            max_pods: 110,
            ephemeral_bytes: 100 << 30,
        }
    }

    #[test]
    fn node_carries_topology_labels_and_cidr() {
        let n = new_node(&facts());
        let l = n.metadata.labels.unwrap();
        assert_eq!(l["topology.kubernetes.io/zone"], "zone-b");
        assert_eq!(l["kubernetes.io/hostname"], "node-2");
        assert_eq!(n.spec.unwrap().pod_cidr.as_deref(), Some("10.244.2.0/24"));
    }

    #[test]
    fn status_is_ready_with_stable_transition_times() {
        let t0 = Timestamp::from_second(1_800_000_000).unwrap();
        let s = node_status(&facts(), None, t0);
        let ready = s.conditions.as_ref().unwrap().iter().find(|c| c.type_ == "Ready").unwrap().clone();
        assert_eq!((ready.status.as_str(), ready.reason.as_deref()), ("True", Some("KubeletReady")));
        assert_eq!(s.daemon_endpoints.as_ref().unwrap().kubelet_endpoint.as_ref().unwrap().port, 10252);
        assert_eq!(s.node_info.as_ref().unwrap().kubelet_version, "v1.34.4");
        assert_eq!(s.capacity.as_ref().unwrap()["memory"].0, format!("{}Ki", 24u64 << 20));
        let t1 = Timestamp::from_second(1_800_000_060).unwrap();
        let later = node_status(&facts(), Some(&s), t1);
        let ready2 = later.conditions.as_ref().unwrap().iter().find(|c| c.type_ == "Ready").unwrap().clone();
        assert_eq!(ready2.last_transition_time, Some(Time(t0)));
        assert_eq!(ready2.last_heartbeat_time, Some(Time(t1)));
    }
}
