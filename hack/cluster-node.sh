#!/usr/bin/env bash
# cluster-node.sh stop|start NODE: loses a node of the local cluster, or brings it back, for
# the scenario of a node lost (e2e/tests/operator.rs).
#   stop:  the node's process kubelet is killed (SIGKILL: a node that dies says nothing) and
#          then every container it ran, so its pods stop answering while the API server still
#          lists them; the node lifecycle controller finds out the way it would on a real
#          machine, from the Lease that is no longer renewed.
#   start: the kubelet again with the command line it had; it adopts its pods' stopped
#          containers and restarts them as their restart policy says.
# STATE is the cluster's state directory (default <repo>/.state/cluster).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
STATE=${STATE:-$repo/.state/cluster}
source "$repo/hack/cluster-net.sh"

action=${1:?stop or start}
node=${2:?node name, e.g. node-2}
pid_file=$STATE/pids/kubelet-$node.pid
# The command line is kept beside the PID file, NUL-separated as /proc has it, so that start
# runs exactly what cluster-up ran.
cmdline_file=$STATE/pids/kubelet-$node.cmdline
fail() { echo "cluster-node: $*" >&2; exit 1; }
[ -f "$pid_file" ] || fail "$node is not a node of the cluster at $STATE"

case $action in
  stop)
    pid=$(cat "$pid_file")
    is_ours "$pid" || fail "the kubelet of $node (PID $pid) is not running"
    cp "/proc/$pid/cmdline" "$cmdline_file"
    kill -KILL "$pid"
    for _ in $(seq 1 100); do [ -e "/proc/$pid" ] || break; sleep 0.1; done
    [ ! -e "/proc/$pid" ] || fail "the kubelet of $node (PID $pid) did not exit"
    containers=$(cluster_podman ps -q --filter "label=$CONTAINER_LABEL=$node")
    if [ -n "$containers" ]; then
      # shellcheck disable=SC2086 # one ID per word
      cluster_podman kill --signal KILL $containers >/dev/null
    fi
    echo "cluster-node: $node lost: its kubelet and $(echo "$containers" | grep -c . || true) containers killed"
    ;;
  start)
    [ -f "$cmdline_file" ] || fail "$node was not stopped by this script: no command line kept"
    pid=$(cat "$pid_file")
    ! is_ours "$pid" || fail "the kubelet of $node already runs (PID $pid)"
    mapfile -d '' command <"$cmdline_file"
    setsid "${command[@]}" >>"$STATE/logs/kubelet-$node.log" 2>&1 </dev/null &
    echo $! >"$pid_file"
    rm -f "$cmdline_file"
    echo "cluster-node: $node started again (kubelet PID $(cat "$pid_file"))"
    ;;
  *) fail "unknown action $action: stop or start" ;;
esac
