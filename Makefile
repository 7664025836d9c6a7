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

.PHONY: all build test lint fmt crds crds-check deps apt-deps py-deps run e2e bench help

all: build

help:
	@echo "make build   compile everything (release binaries in target/release)"
	@echo "make test    install test dependencies, lint, and run every test"
	@echo "make lint    rustfmt check and clippy with warnings as errors"
	@echo "make crds    regenerate $(CRD) from the Rust types"
	@echo "make run     start a local cluster (see README)"
	@echo "make e2e     scenario tests against a kind cluster (KUBECONFIG)"
	@echo "make bench   benchmark against etcd on this machine"

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
	$(CARGO) run -q --locked -p consensus-operator --bin crdgen -- --reference > target/crd-reference.md
	$(PYTHON) hack/splice-readme.py README.md target/crd-reference.md

# Fails when the committed CRD and the Rust types disagree.
crds-check:
	@$(CARGO) run -q --locked -p consensus-operator --bin crdgen | diff -u $(CRD) - \
	  || { echo "$(CRD) is stale: run 'make crds' and commit it"; exit 1; }

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

# Scenario tests against the cluster kubectl points at (kind works: kind create cluster).
e2e:
	@kubectl config current-context >/dev/null 2>&1 || { echo "kubectl has no current cluster: run 'kind create cluster' or set KUBECONFIG"; exit 1; }
	$(CARGO) test --locked -p consensus-e2e -- --ignored --test-threads=1

# Ours and etcd (Debian etcd-server), 3 members each, side by side on this machine.
# Then the time from editing replicas to every voter healthy, 3 -> 5 and 5 -> 3, locally.
bench: apt-deps
	$(CARGO) build --release --locked -p consensus-node -p consensus-e2e
	./target/release/bench
	$(CARGO) build --release --locked -p consensus-operator --bin consensus-operator --bin scale-bench
	./target/release/scale-bench
