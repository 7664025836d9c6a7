#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and etcd from the
# modules go.mod pins, into a cache outside the work tree keyed by a hash of go.mod, go.sum
# and this script; prints the directory holding the binaries. A finished directory is reused;
# CACHE=off builds into a fresh directory with fresh Go module and build caches, so a cold
# build can be timed.
set -euo pipefail
cd "$(dirname "$0")"
# -mod=readonly: a go.sum that does not match go.mod fails the build instead of being
# rewritten in the work tree.
export GOTOOLCHAIN=local GOFLAGS=-mod=readonly CGO_ENABLED=0
key=$( (cat go.mod go.sum build.sh; go env GOVERSION) | sha256sum | cut -c1-16)
root=${CONTROL_PLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/consensus-dev/control-plane}
out="$root/$key"
if [ "${CACHE:-on}" = off ]; then
  cold=$(mktemp -d)
  trap 'chmod -R u+w "$cold"; rm -rf "$cold"' EXIT
  out="$cold/out"
  export GOMODCACHE="$cold/gomod" GOCACHE="$cold/gobuild"
elif [ -e "$out/.complete" ]; then
  echo "$out/bin"; exit 0
fi
k8s=$(go list -m -f '{{.Version}}' k8s.io/kubernetes)
minor=$(echo "$k8s" | cut -d. -f2)
now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
stamp=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  stamp+=" -X $pkg.gitVersion=$k8s -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  stamp+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$now"
done
mkdir -p "$out/bin.partial"
start=$SECONDS
build() { # output-name package
  go build -trimpath -tags selinux,notest,grpcnotrace -ldflags "-s -w$stamp" -o "$out/bin.partial/$1" "$2" >&2
  echo "built $1 ($((SECONDS - start)) s)" >&2
}
build etcd go.etcd.io/etcd/server/v3
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  build "$cmd" "k8s.io/kubernetes/cmd/$cmd"
done
rm -rf "$out/bin" && mv "$out/bin.partial" "$out/bin"
if [ "${CACHE:-on}" = off ]; then
  # A cold build is for timing; keep its result under the key so it is not wasted.
  mkdir -p "$root/$key" && rm -rf "$root/$key/bin" && cp -a "$out/bin" "$root/$key/bin"
  out="$root/$key"
fi
touch "$out/.complete"
echo "control plane built in $((SECONDS - start)) s" >&2
echo "$out/bin"
