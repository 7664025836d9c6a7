#!/usr/bin/env bash
# Checks that the local cluster keeps to the machine: every listener of the processes
# cluster-up started binds to loopback or the bridge address; no pod namespace has a route
# beyond the bridge (an address outside the pod range is unreachable from inside, and so is a
# Service address); the Service range is unreachable from the host; nothing is forwarded from
# the bridge to another interface and nothing is masqueraded. Prints each finding; exits
# non-zero if it finds any violation. Run while the cluster is up; the StatefulSet scenario
# runs it while its members run (consensus_e2e::check_local_containment).
# Environment: STATE (default <repo>/.state/cluster).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
STATE=${STATE:-$repo/.state/cluster}
. "$repo/hack/cluster-net.sh"
violations=0
bad() { echo "containment: VIOLATION: $*" >&2; violations=$((violations + 1)); }
ok() { echo "containment: ok: $*" >&2; }

[ -d "$STATE/pids" ] || { echo "containment: no cluster at $STATE" >&2; exit 2; }

# Listeners of our processes (and their children) in the host's namespace.
pids=$(cat "$STATE"/pids/*.pid)
descendants() { local p; for p in "$@"; do echo "$p"; descendants $(pgrep -P "$p" || true); done; }
all=$(descendants $pids | sort -u | paste -sd'|')
listeners=$(ss -Htlnup | grep -E "pid=($all)," || true)
[ -n "$listeners" ] || bad "no listener found for the cluster's processes (is it up?)"
while read -r line; do
  [ -n "$line" ] || continue
  local_addr=$(awk '{print $5}' <<<"$line")
  case "$local_addr" in
    127.0.0.1:* | "$GATEWAY":* | "[::1]":*) ;;
    *) bad "listener on $local_addr: $(grep -o 'users:.*' <<<"$line")" ;;
  esac
done <<<"$listeners"
ok "$(wc -l <<<"$listeners") listeners, each on loopback or $GATEWAY"

# The host: Service addresses lead nowhere.
route=$(ip route get "$SERVICE_IP" 2>&1 || true)
if grep -q -i -e unreachable -e "no route to host" <<<"$route"; then ok "Service range $SERVICE_CIDR unreachable from the host"
else bad "$SERVICE_IP is routable from the host: $route"; fi

# Every pod namespace: on-link pod range only, no default route.
outside=192.0.2.1 # TEST-NET-1: an address outside every range the cluster uses
# A pod of another test may be deleted while this runs: a namespace gone between the listing
# and its reading has nothing left to check.
pods=0 gone=0
for ns in $(ip netns list | awk '{print $1}' | grep "^$NETNS_PREFIX" || true); do
  routes=$(ip -n "$ns" route show 2>/dev/null) || { gone=$((gone + 1)); continue; }
  pods=$((pods + 1))
  grep -q '^default' <<<"$routes" && bad "$ns has a default route"
  ip -n "$ns" route get "$outside" >/dev/null 2>&1 && bad "$ns can route to $outside"
  ip -n "$ns" route get "$SERVICE_IP" >/dev/null 2>&1 && bad "$ns can route to $SERVICE_IP"
done
ok "$pods pod namespaces without a route beyond the bridge ($gone gone while looked at)"

# Forwarding off the bridge is dropped; no NAT rule of any kind exists for the pod range.
ruleset=$(nft list table inet "$NFT_TABLE" 2>/dev/null || true)
grep -q "iifname \"$BRIDGE\" oifname != \"$BRIDGE\" drop" <<<"$ruleset" || bad "no rule drops forwarding off $BRIDGE"
grep -q "oifname \"$BRIDGE\" iifname != \"$BRIDGE\" drop" <<<"$ruleset" || bad "no rule drops forwarding onto $BRIDGE"
if nft list ruleset 2>/dev/null | grep -q -i masquerade; then
  nft list ruleset 2>/dev/null | grep -i -B3 masquerade | grep -q '10\.244\.' && bad "a masquerade rule covers the pod range"
fi
ok "forwarding off $BRIDGE dropped, no masquerade for the pod range"

[ "$violations" = 0 ] || { echo "containment: $violations violations" >&2; exit 1; }
echo "containment: the cluster keeps to the machine" >&2
