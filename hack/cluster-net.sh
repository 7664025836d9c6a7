# The local cluster's names and addresses, shared by cluster-up.sh, cluster-down.sh and
# cluster-containment-check.sh (sourced; they set STATE first).
# Pods live in 10.244.0.0/16 on the bridge (node i owns 10.244.i.0/24); the API server, DNS
# and the kubelets listen on the bridge's own address; Service addresses lead nowhere.
BRIDGE=ccbr0
GATEWAY=10.244.0.1
POD_PREFIX_LEN=16
SERVICE_CIDR=10.96.0.0/16
SERVICE_IP=10.96.0.1
API_PORT=6443
NFT_TABLE=consensus_dev
# What the process kubelet names its pods' namespaces and host-side veths, and the label on
# every container it starts (e2e/src/kubelet/sandbox.rs, podman.rs).
NETNS_PREFIX=ccpod-
VETH_PREFIX=cv
CONTAINER_LABEL=consensus-dev.node
# Left in STATE by cluster-up once it made the bridge: the bridge, the pod namespaces and
# containers, the route and the table are this cluster's to remove.
NETWORK_MARKER=owns-network

# is_ours PID: the process still runs and is one cluster-up started for STATE (every command
# it starts names the state directory), not one that reused the number.
is_ours() {
  { tr '\0' ' ' </proc/"$1"/cmdline; } 2>/dev/null | grep -qF -- "$STATE"
}
# podman with the global flags the kubelet uses (runc; no systemd here).
cluster_podman() {
  podman --runtime runc --cgroup-manager cgroupfs --events-backend file "$@"
}
pod_namespaces() {
  ip netns list | awk '{print $1}' | grep "^$NETNS_PREFIX" || true
}
