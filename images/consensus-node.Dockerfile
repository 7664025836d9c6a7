# consensus-node: a Raft member serving the etcd v3 API (run by the operator's StatefulSets).
#
# The build context is the root filesystem `make images` stages in target/images/consensus-node
# (hack/stage-image.sh): the stripped binary, the shared libraries it links with their
# loader, a CA bundle and /etc/passwd and /etc/group naming uid 65532. So the default base is
# scratch and the build pulls nothing:
#   make images                                     # podman, here
#   make images CONTAINER_TOOL=docker               # Docker (then: kind load docker-image)
#   docker build -f images/consensus-node.Dockerfile -t consensus-node:TAG target/images/consensus-node
# --build-arg BASE=gcr.io/distroless/cc-debian12 (or debian:bookworm-slim) puts the same
# files on a conventional base, for a shell or tools beside the binary.
ARG BASE=scratch
FROM ${BASE}
# One COPY per top-level directory rather than the whole tree onto /: on a merged-/usr base
# /lib and /lib64 are symlinks, and BuildKit refuses to copy a directory over a symlink
# while it follows a symlink named as the destination.
COPY lib/ /lib/
COPY lib64/ /lib64/
COPY etc/ /etc/
COPY usr/ /usr/
# The StatefulSet names the command (`consensus-node`), not its path; scratch has no PATH.
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# The manifests also run it as 65532 with a read-only root filesystem; the data directory
# and /tmp are volumes.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/consensus-node"]
