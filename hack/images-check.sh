#!/usr/bin/env bash
# Checks the images `make images` built, as a pod would run them: as uid 65532, with a
# read-only root filesystem, logs to a pipe without colour codes, and a one-member
# consensus-node serving etcdctl put/get from a data volume owned by 65532. Prints each
# image's size. Usage: hack/images-check.sh TAG (CONTAINER_TOOL, CONTAINER_RUN_FLAGS from
# the environment; the Makefile sets both).
set -euo pipefail

tag=$1
tool=${CONTAINER_TOOL:-podman}
# Word splitting intended: a list of flags.
read -r -a run_flags <<<"${CONTAINER_RUN_FLAGS:-}"
# Without CAP_SYS_RESOURCE the runtime's default rlimits are refused, and so is anything
# above the limits of the runtime's own processes: here podman lowers its own (conmon's)
# nproc to 32768, below the shell's. A member needs far fewer files and threads than these
# caps, so they are what the check asks for unless the shell's limits are lower still.
cap() { if [ "$1" = unlimited ] || [ "$1" -gt "$2" ]; then echo "$2"; else echo "$1"; fi; }
nofile=$(cap "$(ulimit -n)" 65536)
nproc=$(cap "$(ulimit -u)" 4096)
run_flags+=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
etcdctl=$(command -v etcdctl) || { echo "images-check: etcdctl is missing (Debian package etcd-client)" >&2; exit 1; }

fail() {
    echo "images-check: $*" >&2
    exit 1
}

no_escape() {
    # $1: what it is, $2: the text
    if [[ $2 == *$'\e'* ]]; then
        fail "$1 carries colour codes (ESC) although its output is a pipe: $(printf '%q' "$2" | head -c 400)"
    fi
}

for image in consensus-node consensus-operator; do
    user=$("$tool" image inspect --format '{{.Config.User}}' "$image:$tag")
    [ "$user" = 65532:65532 ] || fail "$image:$tag runs as '$user', not 65532:65532"
    # $(...) makes stdout a pipe, as a container runtime's log does.
    version=$("$tool" run --rm "${run_flags[@]}" --read-only "$image:$tag" --version 2>&1) \
        || fail "$image:$tag --version failed: $version"
    [ "$version" = "$image $tag" ] || fail "$image:$tag --version printed '$version', not '$image $tag'"
    help=$("$tool" run --rm "${run_flags[@]}" --read-only "$image:$tag" --help 2>&1) \
        || fail "$image:$tag --help failed: $help"
    no_escape "$image --help" "$help"
done

# A member in the image, as the StatefulSet runs it: read-only root, its data on a volume
# owned by 65532 (a PVC), client port published on loopback only.
work=$(mktemp -d)
container=consensus-images-check-$$
cleanup() {
    "$tool" rm -f "$container" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
mkdir "$work/data"
chown 65532:65532 "$work/data"
chmod 0700 "$work/data"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$tool" run -d --name "$container" "${run_flags[@]}" --read-only \
    -v "$work/data:/var/lib/consensus" -p "127.0.0.1:$port:2379" \
    "consensus-node:$tag" run --name check --data-dir /var/lib/consensus/data \
    --listen-client-urls http://0.0.0.0:2379 --advertise-client-urls "http://127.0.0.1:$port" \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --listen-metrics-urls http://127.0.0.1:2381 >/dev/null

export ETCDCTL_API=3
endpoint=127.0.0.1:$port
value="written through the image at $(date +%s)"
deadline=$((SECONDS + 60))
until "$etcdctl" --endpoints "$endpoint" --dial-timeout 2s --command-timeout 5s put images-check "$value" >/dev/null 2>&1; do
    running=$("$tool" inspect --format '{{.State.Running}}' "$container" 2>/dev/null || echo false)
    if [ "$running" != true ] || [ $SECONDS -ge $deadline ]; then
        echo "--- member log:" >&2
        "$tool" logs "$container" >&2 || true
        fail "the member in consensus-node:$tag did not accept a put on $endpoint (running: $running)"
    fi
    sleep 0.5
done
got=$("$etcdctl" --endpoints "$endpoint" --command-timeout 5s get --print-value-only images-check)
[ "$got" = "$value" ] || fail "get returned '$got', not '$value'"

# Files the member made are owned by the uid it ran as.
owners=$(find "$work/data" -mindepth 1 -printf '%U:%G\n' | sort -u)
[ -n "$owners" ] || fail "the member wrote nothing to its data volume"
[ "$owners" = 65532:65532 ] || fail "files in the data volume are owned by $owners, not 65532:65532"

logs=$("$tool" logs "$container" 2>&1)
[[ $logs == *"starting member"* ]] || fail "the member's log has no 'starting member' line: $logs"
no_escape "the member's log" "$logs"
"$tool" stop --time 10 "$container" >/dev/null
exit_code=$("$tool" inspect --format '{{.State.ExitCode}}' "$container")
[ "$exit_code" = 0 ] || fail "the member exited with $exit_code after SIGTERM"

echo "images-check: consensus-node:$tag and consensus-operator:$tag run as 65532:65532 with a read-only root; etcdctl put/get through the member on $endpoint; no colour codes in logs"
for image in consensus-node consensus-operator; do
    size=$("$tool" image inspect --format '{{.Size}}' "$image:$tag")
    echo "$image:$tag $((size / 1000)) kB ($size bytes)"
done
