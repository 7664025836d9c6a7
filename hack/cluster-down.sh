#!/usr/bin/env bash
# Stops every process hack/cluster-up.sh started (by the PIDs it recorded), removes the
# containers, network namespaces, bridge, route and nftables table it made and its state
# directory; then checks that none of them is left and fails, naming it, if one is.
# The bridge and what hangs off it are removed only when this state directory made them
# (cluster-up leaves a marker): a cluster-up refused because another cluster holds the bridge
# must not tear that cluster down.
# Environment: STATE (default <repo>/.state/cluster).
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
STATE=${STATE:-$repo/.state/cluster}
. "$repo/hack/cluster-net.sh"
log() { echo "cluster-down: $*" >&2; }
owns_network=false
[ -e "$STATE/$NETWORK_MARKER" ] && owns_network=true

# stop PIDFILE...: SIGTERM, up to 15 s for each to exit, then SIGKILL. Each component was
# started with setsid, so its process group (podman clients the kubelet runs) goes with it.
# A recorded PID is signalled only while it is still one of ours (its command line names
# the state directory), never a process that reused the number.
stop() {
  local pids=() f pid
  for f in "$@"; do [ -f "$f" ] && pid=$(cat "$f") && is_ours "$pid" && pids+=("$pid"); done
  [ ${#pids[@]} -gt 0 ] || return 0
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null; done
  local deadline=$((SECONDS + 15))
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    is_ours "$pid" && { kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null; }
  done
  return 0
}
if [ -d "$STATE/pids" ]; then
  # Nodes first so nothing restarts pods while the control plane goes; etcd last.
  stop "$STATE"/pids/kubelet-*.pid
  stop "$STATE"/pids/cluster-services.pid
  stop "$STATE"/pids/kube-scheduler.pid "$STATE"/pids/kube-controller-manager.pid
  stop "$STATE"/pids/kube-apiserver.pid
  stop "$STATE"/pids/etcd.pid
fi

# The kubelets' containers. A kubelet stopped while a `podman run` was under way can leave a
# container that appears only after a first removal (its conmon outlives the client), so
# removal repeats until none is listed, for up to 30 s.
containers() { cluster_podman ps -aq --filter "label=$CONTAINER_LABEL"; }
if $owns_network && command -v podman >/dev/null; then
  deadline=$((SECONDS + 30))
  while ids=$(containers) && [ -n "$ids" ] && [ $SECONDS -lt $deadline ]; do
    cluster_podman rm -f -t 0 $ids >/dev/null
    sleep 0.5
  done
fi
if $owns_network; then
  # A container podman no longer lists can still run in its pod's namespace (its run was
  # cut short with the kubelet); whatever runs there goes before the namespace does.
  for ns in $(pod_namespaces); do
    pids=$(ip netns pids "$ns" 2>/dev/null)
    [ -z "$pids" ] || kill -KILL $pids 2>/dev/null
    ip netns delete "$ns"
  done
  ip link show "$BRIDGE" >/dev/null 2>&1 && ip link delete "$BRIDGE"
  ip route show type unreachable | grep -q "^unreachable $SERVICE_CIDR" && ip route del unreachable "$SERVICE_CIDR"
  nft list table inet "$NFT_TABLE" >/dev/null 2>&1 && nft delete table inet "$NFT_TABLE"
fi

# Processes that name the state directory, other than this script and what called it (a
# make recipe's command line may name it too). A container's conmon exits just after the
# container is removed, so they get a few seconds to go.
ancestors=" $$ "
p=$$
while [ -n "$p" ] && [ "$p" -gt 1 ]; do p=$(ps -o ppid= -p "$p" | tr -d ' '); ancestors+="$p "; done
leftover_processes() {
  local pid
  for pid in $(pgrep -f -- "$STATE"); do
    case "$ancestors" in *" $pid "*) ;; *) echo "$pid" ;; esac
  done
}
# A pod's host-side veth goes once the last process in its namespace has.
stray_veths() { $owns_network && { ip -o link show | grep -o " $VETH_PREFIX[0-9a-f]\{8\}" || true; }; }
deadline=$((SECONDS + 20))
while { [ -n "$(leftover_processes)" ] || [ -n "$(stray_veths)" ]; } && [ $SECONDS -lt $deadline ]; do
  # A conmon whose container was removed meanwhile (above) goes with a second removal.
  if $owns_network; then ids=$(containers) && [ -n "$ids" ] && cluster_podman rm -f -t 0 $ids >/dev/null; fi
  sleep 0.2
done
[ -d "$STATE" ] && rm -rf "$STATE"

# What is left is a failure: name it.
left=""
[ -e "$STATE" ] && left+=" state:$STATE"
for pid in $(leftover_processes); do left+=" process:$pid($(tr '\0' ' ' </proc/$pid/cmdline 2>/dev/null | cut -c1-60))"; done
if $owns_network; then
  for ns in $(pod_namespaces); do left+=" netns:$ns"; done
  for veth in $(stray_veths); do left+=" veth:$veth"; done
  ip link show "$BRIDGE" >/dev/null 2>&1 && left+=" bridge:$BRIDGE"
  ip route show type unreachable | grep -q "^unreachable $SERVICE_CIDR" && left+=" route:$SERVICE_CIDR"
  nft list table inet "$NFT_TABLE" >/dev/null 2>&1 && left+=" nft:$NFT_TABLE"
  if command -v podman >/dev/null; then
    if ! ids=$(containers); then left+=" containers:(podman ps failed)"
    elif [ -n "$ids" ]; then left+=" containers:$(echo $ids)"; fi
  fi
elif ip link show "$BRIDGE" >/dev/null 2>&1; then
  log "$BRIDGE belongs to another cluster (no $NETWORK_MARKER in $STATE): left to it"
fi
if [ -n "$left" ]; then log "left behind:$left"; exit 1; fi
log "down in $SECONDS s, nothing left behind"
