#!/usr/bin/env bash
# Stops every process hack/cluster-up.sh started (by the PIDs it recorded), removes the
# containers, network namespaces, bridge, route and nftables table it made and its state
# directory; then checks that none of them is left and fails, naming it, if one is.
# Environment: STATE (default <repo>/.state/cluster).
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
STATE=${STATE:-$repo/.state/cluster}
. "$repo/hack/cluster-net.sh"
log() { echo "cluster-down: $*" >&2; }

# stop PIDFILE...: SIGTERM, up to 15 s for each to exit, then SIGKILL. Each component was
# started with setsid, so its process group (podman clients the kubelet runs) goes with it.
stop() {
  local pids=() f pid
  for f in "$@"; do [ -f "$f" ] && pid=$(cat "$f") && kill -0 "$pid" 2>/dev/null && pids+=("$pid"); done
  [ ${#pids[@]} -gt 0 ] || return 0
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null; done
  local deadline=$((SECONDS + 15))
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null; kill -KILL "$pid" 2>/dev/null
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
# A kubelet stopped while a `podman run` was under way can leave a container that appears
# only after a first removal (its conmon outlives the client), so removal repeats until
# none is listed, for up to 30 s.
if command -v podman >/dev/null; then
  deadline=$((SECONDS + 30))
  while ids=$(podman ps -aq --filter label=consensus-dev.node 2>/dev/null); [ -n "$ids" ] && [ $SECONDS -lt $deadline ]; do
    podman rm -f -t 0 $ids >/dev/null 2>&1
    sleep 0.5
  done
fi
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$NETNS_PREFIX"); do ip netns delete "$ns"; done
ip link show "$BRIDGE" >/dev/null 2>&1 && ip link delete "$BRIDGE"
ip route show type unreachable | grep -q "^unreachable $SERVICE_CIDR" && ip route del unreachable "$SERVICE_CIDR"
nft list table inet "$NFT_TABLE" >/dev/null 2>&1 && nft delete table inet "$NFT_TABLE"
[ -d "$STATE" ] && rm -rf "$STATE"

# Processes that name the state directory, other than this script and what called it (a
# make recipe's command line may name it too). A container's conmon exits just after the
# container is removed, so they get a few seconds to go.
ancestors=" $$ "
p=$$
while [ "$p" -gt 1 ]; do p=$(ps -o ppid= -p "$p" | tr -d ' '); ancestors+="$p "; done
leftover_processes() {
  local pid
  for pid in $(pgrep -f -- "$STATE" 2>/dev/null); do
    case "$ancestors" in *" $pid "*) ;; *) echo "$pid" ;; esac
  done
}
deadline=$((SECONDS + 10))
while [ -n "$(leftover_processes)" ] && [ $SECONDS -lt $deadline ]; do
  # A conmon whose container was removed meanwhile (above) goes with a second removal.
  ids=$(podman ps -aq --filter label=consensus-dev.node 2>/dev/null || true)
  [ -z "$ids" ] || podman rm -f -t 0 $ids >/dev/null 2>&1
  sleep 0.2
done

# What is left is a failure: name it.
left=""
if [ -d "$STATE/pids" ]; then left+=" state:$STATE"; fi
for pid in $(leftover_processes); do left+=" process:$pid($(tr '\0' ' ' </proc/$pid/cmdline 2>/dev/null | cut -c1-60))"; done
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$NETNS_PREFIX"); do left+=" netns:$ns"; done
ip link show "$BRIDGE" >/dev/null 2>&1 && left+=" bridge:$BRIDGE"
ip route show type unreachable | grep -q "^unreachable $SERVICE_CIDR" && left+=" route:$SERVICE_CIDR"
nft list table inet "$NFT_TABLE" >/dev/null 2>&1 && left+=" nft:$NFT_TABLE"
if command -v podman >/dev/null && [ -n "$(podman ps -aq --filter label=consensus-dev.node 2>/dev/null)" ]; then left+=" containers"; fi
if [ -n "$left" ]; then log "left behind:$left"; exit 1; fi
log "down in $SECONDS s, nothing left behind"
