#!/usr/bin/env bash
# Starts a local Kubernetes: etcd, kube-apiserver, kube-controller-manager and kube-scheduler
# (built from Go modules by hack/control-plane/build.sh), cluster DNS and a directory volume
# provisioner, and NODES process kubelets labelled with three zones, all on a host bridge that
# nothing leaves. Returns once every node is Ready, printing the two export lines to use it.
# `hack/cluster-down.sh` stops every process this started, by PID, and removes what it made.
#
# Usage (as root): hack/cluster-up.sh CONTROL_PLANE_BIN_DIR PROCESS_KUBELET_BINARY
# Environment: STATE (default <repo>/.state/cluster), NODES (default 6, two per zone).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=$(cd "${1:?control-plane bin dir}" && pwd)
kubelet_bin=$(realpath "${2:?process-kubelet binary}")
STATE=${STATE:-$repo/.state/cluster}
NODES=${NODES:-6}
. "$repo/hack/cluster-net.sh"

log() { echo "cluster-up: $*" >&2; }
fail() { log "$*"; exit 1; }
[ "$(id -u)" = 0 ] || fail "needs root (network namespaces, a bridge, containers)"
for tool in ip ss nft openssl podman curl python3 pgrep; do
  command -v $tool >/dev/null || fail "$tool is missing (make cluster-up installs it)"
done

# A cluster that is up already is reused: its state directory holds live PIDs.
if [ -d "$STATE/pids" ] && [ -n "$(ls "$STATE/pids")" ]; then
  alive=0; total=0
  for f in "$STATE"/pids/*.pid; do total=$((total + 1)); is_ours "$(cat "$f")" && alive=$((alive + 1)); done
  if [ "$alive" = "$total" ]; then
    log "already up ($total processes)"
    echo "export KUBECONFIG=$STATE/kubeconfig/admin.kubeconfig"
    echo "export PATH=$bin:\$PATH"
    exit 0
  fi
  fail "$STATE holds a cluster with $((total - alive)) of $total processes gone: run hack/cluster-down.sh first"
fi
ip link show "$BRIDGE" >/dev/null 2>&1 && fail "bridge $BRIDGE exists already: run hack/cluster-down.sh first"

mkdir -p "$STATE"/{pki,kubeconfig,pids,logs,etcd,volumes,nodes}
pki=$STATE/pki
trap 'log "failed; the logs are in $STATE/logs; hack/cluster-down.sh cleans up"' ERR

# --- network: a bridge for pods and the control plane, and nothing beyond it ----------------
ip link add "$BRIDGE" type bridge
touch "$STATE/$NETWORK_MARKER"
ip addr add "$GATEWAY/$POD_PREFIX_LEN" dev "$BRIDGE"
ip link set "$BRIDGE" up
# No kube-proxy: Service addresses lead nowhere, and must not leak to a default route.
ip route add unreachable "$SERVICE_CIDR"
# Nothing from or to the bridge is forwarded to another interface (the host may route).
nft -f - <<EOF
table inet $NFT_TABLE {
  chain forward {
    type filter hook forward priority filter; policy accept;
    iifname "$BRIDGE" oifname != "$BRIDGE" drop
    oifname "$BRIDGE" iifname != "$BRIDGE" drop
  }
}
EOF

# --- PKI: one CA; every component has its own identity ------------------------------------
openssl_quiet() { openssl "$@" 2>/dev/null; }
openssl_quiet req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=consensus-dev-ca" \
  -keyout "$pki/ca.key" -out "$pki/ca.crt"
# cert NAME SUBJECT [SANS]: a key and a certificate signed by the CA.
cert() {
  local name=$1 subject=$2 sans=${3:-}
  openssl_quiet req -newkey rsa:2048 -nodes -subj "$subject" -keyout "$pki/$name.key" -out "$pki/$name.csr"
  local ext="$pki/$name.ext"
  if [ -n "$sans" ]; then
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$sans" > "$ext"
  else
    printf 'extendedKeyUsage=clientAuth\n' > "$ext"
  fi
  openssl_quiet x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 30 -extfile "$ext" -out "$pki/$name.crt"
  rm -f "$pki/$name.csr" "$ext"
}
cert apiserver "/CN=kube-apiserver" \
  "IP:$GATEWAY,IP:127.0.0.1,IP:$SERVICE_IP,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
cert kubelet-serving "/CN=process-kubelet" "IP:$GATEWAY"
cert admin "/O=system:masters/CN=consensus-dev-admin"
cert controller-manager "/CN=system:kube-controller-manager"
cert scheduler "/CN=system:kube-scheduler"
cert cluster-services "/CN=consensus-dev:cluster-services"
openssl_quiet genrsa -out "$pki/service-account.key" 2048
openssl_quiet rsa -in "$pki/service-account.key" -pubout -out "$pki/service-account.pub"

kubectl="$bin/kubectl"
server="https://$GATEWAY:$API_PORT"
# kubeconfig NAME: a kubeconfig for the identity whose certificate is pki/NAME.crt.
kubeconfig() {
  local file="$STATE/kubeconfig/$1.kubeconfig" cert_name=${2:-$1}
  "$kubectl" config set-cluster local --server="$server" --certificate-authority="$pki/ca.crt" \
    --embed-certs --kubeconfig="$file" >/dev/null
  "$kubectl" config set-credentials "$1" --client-certificate="$pki/$cert_name.crt" \
    --client-key="$pki/$cert_name.key" --embed-certs --kubeconfig="$file" >/dev/null
  "$kubectl" config set-context local --cluster=local --user="$1" --kubeconfig="$file" >/dev/null
  "$kubectl" config use-context local --kubeconfig="$file" >/dev/null
}
for identity in admin controller-manager scheduler cluster-services; do kubeconfig $identity; done
export KUBECONFIG=$STATE/kubeconfig/admin.kubeconfig

# start NAME COMMAND...: runs a process in the background, its PID in pids/NAME.pid.
start() {
  local name=$1; shift
  setsid "$@" >"$STATE/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/pids/$name.pid"
}
# wait_for WHAT SECONDS COMMAND...: polls COMMAND until it succeeds, or fails at the deadline.
wait_for() {
  local what=$1 deadline=$((SECONDS + $2)); shift 2
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || fail "$what did not happen within the deadline"
    sleep 0.5
  done
}
# free_ports N: N distinct free loopback ports (all held open until all are chosen).
free_ports() {
  python3 -c 'import socket,sys; s=[socket.socket() for _ in range(int(sys.argv[1]))]
[x.bind(("127.0.0.1", 0)) for x in s]; print(" ".join(str(x.getsockname()[1]) for x in s))' "$1"
}

# --- control plane -------------------------------------------------------------------------
read -r etcd_client etcd_peer <<<"$(free_ports 2)"
start etcd "$bin/etcd" --name control-plane --data-dir "$STATE/etcd" \
  --listen-client-urls "http://127.0.0.1:$etcd_client" --advertise-client-urls "http://127.0.0.1:$etcd_client" \
  --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
  --initial-cluster "control-plane=http://127.0.0.1:$etcd_peer" --log-level warn
wait_for "etcd serving" 60 curl -fsS "http://127.0.0.1:$etcd_client/health"

start kube-apiserver "$bin/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$etcd_client" \
  --bind-address "$GATEWAY" --advertise-address "$GATEWAY" --secure-port "$API_PORT" \
  --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
  --client-ca-file "$pki/ca.crt" \
  --service-account-issuer "https://kubernetes.default.svc.cluster.local" \
  --service-account-key-file "$pki/service-account.pub" \
  --service-account-signing-key-file "$pki/service-account.key" \
  --service-cluster-ip-range "$SERVICE_CIDR" \
  --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
  --kubelet-client-certificate "$pki/apiserver-kubelet-client.crt" \
  --kubelet-client-key "$pki/apiserver-kubelet-client.key" \
  --kubelet-certificate-authority "$pki/ca.crt" \
  --kubelet-preferred-address-types InternalIP \
  --allow-privileged=false --profiling=false
wait_for "kube-apiserver ready" 120 "$kubectl" get --raw /readyz

start kube-controller-manager "$bin/kube-controller-manager" \
  --kubeconfig "$STATE/kubeconfig/controller-manager.kubeconfig" \
  --authentication-kubeconfig "$STATE/kubeconfig/controller-manager.kubeconfig" \
  --authorization-kubeconfig "$STATE/kubeconfig/controller-manager.kubeconfig" \
  --bind-address 127.0.0.1 --secure-port 0 --leader-elect=false \
  --use-service-account-credentials \
  --service-account-private-key-file "$pki/service-account.key" --root-ca-file "$pki/ca.crt" \
  --cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key" \
  --service-cluster-ip-range "$SERVICE_CIDR" --controllers '*'
start kube-scheduler "$bin/kube-scheduler" \
  --kubeconfig "$STATE/kubeconfig/scheduler.kubeconfig" \
  --authentication-kubeconfig "$STATE/kubeconfig/scheduler.kubeconfig" \
  --authorization-kubeconfig "$STATE/kubeconfig/scheduler.kubeconfig" \
  --bind-address 127.0.0.1 --secure-port 0 --leader-elect=false

# --- what the cluster services need, then the services and the nodes ----------------------
"$kubectl" apply --server-side --field-manager cluster-up -f "$repo/hack/cluster-bootstrap.yaml" >/dev/null
start cluster-services "$kubelet_bin" cluster-services \
  --kubeconfig "$STATE/kubeconfig/cluster-services.kubeconfig" \
  --dns-listen "$GATEWAY:53" --cluster-domain cluster.local \
  --volumes-dir "$STATE/volumes" --provisioner-name consensus.dev/local-directory

zones=(zone-a zone-b zone-c)
for i in $(seq 1 "$NODES"); do
  zone=${zones[$(((i - 1) % 3))]}
  node="node-$i"
  cert "node-$i" "/O=system:nodes/CN=system:node:$node"
  kubeconfig "node-$i"
  start "kubelet-$node" "$kubelet_bin" node --name "$node" --zone "$zone" --node-number "$i" \
    --kubeconfig "$STATE/kubeconfig/node-$i.kubeconfig" \
    --tls-cert "$pki/kubelet-serving.crt" --tls-key "$pki/kubelet-serving.key" --client-ca "$pki/ca.crt" \
    --bridge "$BRIDGE" --gateway "$GATEWAY" --cluster-dns "$GATEWAY" --cluster-domain cluster.local \
    --api-server-host "$GATEWAY" --api-server-port "$API_PORT" --state-dir "$STATE"
done
nodes_ready() {
  [ "$("$kubectl" get nodes -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c True)" = "$NODES" ]
}
wait_for "$NODES nodes Ready" 120 nodes_ready
wait_for "the default ServiceAccount" 60 "$kubectl" -n default get serviceaccount default
trap - ERR
log "up in $SECONDS s: $NODES nodes in 3 zones; state in $STATE"
echo "export KUBECONFIG=$STATE/kubeconfig/admin.kubeconfig"
echo "export PATH=$bin:\$PATH"
