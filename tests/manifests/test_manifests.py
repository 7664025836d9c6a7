"""Every manifest validates against the Kubernetes 1.33 schemas (kubernetes-validate,
strict: unknown fields are errors), the CRD against apiextensions.k8s.io/v1, and every
sample against the CRD's own openAPIV3Schema."""

import copy
import pathlib
import tomllib

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2] / "manifests"
GOLDEN = ROOT.parent / "operator" / "tests" / "golden"
KUBERNETES_VERSION = "1.33.0"
CRD_PATH = ROOT / "crds" / "consensus.dev_consensusclusters.yaml"


class Loader(yaml.SafeLoader):
    """YAML as Kubernetes reads it: an unquoted RFC 3339 time is a string, not a date."""


Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def documents(path):
    with open(path) as f:
        return [d for d in yaml.load_all(f, Loader=Loader) if d]


def kustomizations():
    return sorted(ROOT.rglob("kustomization.yaml"))


def manifest_files():
    return sorted(p for p in ROOT.rglob("*.yaml") if p.name != "kustomization.yaml")


def builtin_documents():
    return [
        pytest.param(doc, id=f"{path.relative_to(ROOT)}:{doc['kind']}")
        for path in manifest_files()
        for doc in documents(path)
        if doc["apiVersion"] != "consensus.dev/v1alpha1"
    ]


def samples():
    return [
        pytest.param(doc, id=str(path.relative_to(ROOT)))
        for path in sorted((ROOT / "samples").glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in documents(path)
    ]


@pytest.mark.parametrize("doc", builtin_documents())
def test_validates_against_kubernetes_schemas(doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("path", kustomizations(), ids=lambda p: str(p.relative_to(ROOT)))
def test_kustomization_lists_exactly_the_files_beside_it(path):
    listed = {str(r) for r in documents(path)[0].get("resources", [])}
    for resource in listed:
        assert (path.parent / resource).exists(), f"{path}: {resource} does not exist"
    beside = {
        p.name for p in path.parent.glob("*.yaml") if p.name != "kustomization.yaml"
    } | {p.name for p in path.parent.iterdir() if p.is_dir()}
    # Samples are applied by users one at a time, not as part of the operator's base.
    if path.parent == ROOT:
        beside.discard("samples")
    assert beside <= listed, f"{path}: not listed: {sorted(beside - listed)}"


def crd_schema():
    (crd,) = documents(CRD_PATH)
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def as_json_schema(node):
    """OpenAPI v3 as the API server reads it: `nullable` admits null, and an object with
    declared properties rejects unknown ones (kubectl's strict field validation)."""
    node = copy.deepcopy(node)
    if node.pop("nullable", False) and "type" in node:
        node["type"] = [node["type"], "null"]
    for key in ("x-kubernetes-validations", "x-kubernetes-int-or-string", "format"):
        node.pop(key, None)
    if "properties" in node:
        node["properties"] = {k: as_json_schema(v) for k, v in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            node[key] = as_json_schema(node[key])
    for key in ("anyOf", "oneOf", "allOf"):
        if key in node:
            node[key] = [as_json_schema(n) for n in node[key]]
    return node


def sample_validator():
    schema = as_json_schema(crd_schema())
    # apiVersion, kind and metadata are checked by the API server itself, not by the CRD schema.
    schema["properties"]["apiVersion"] = {"const": "consensus.dev/v1alpha1"}
    schema["properties"]["kind"] = {"const": "ConsensusCluster"}
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("doc", samples())
def test_sample_validates_against_the_generated_crd(doc):
    sample_validator().validate(doc)


def test_crd_schema_rejects_what_users_get_wrong():
    validator = sample_validator()
    (good,) = documents(ROOT / "samples" / "three-members.yaml")
    for path, bad_value in [
        (("spec", "replicas"), "three"),
        (("spec", "storage", "size"), "lots"),
        (("spec", "storage", "reclaimPolicy"), "Recycle"),
        (("spec", "placement", "zoneSpread"), "Sometimes"),
        (("spec", "replicaz"), 3),
    ]:
        doc = copy.deepcopy(good)
        target = doc
        for key in path[:-1]:
            target = target.setdefault(key, {})
        target[path[-1]] = bad_value
        assert not validator.is_valid(doc), f"{'.'.join(path)}={bad_value!r} was accepted"


def test_rbac_has_no_wildcards():
    for path in sorted((ROOT / "rbac").glob("*role.yaml")):
        for doc in documents(path):
            for rule in doc["rules"]:
                for key in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule[key], f"{path.name}: wildcard in {key}"


def test_operator_runs_two_replicas_locked_down():
    (deployment,) = documents(ROOT / "operator" / "deployment.yaml")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in pod["containers"]:
        ctx = container["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"]["drop"] == ["ALL"]
        assert "add" not in ctx["capabilities"]


def workspace_version():
    with open(ROOT.parent / "Cargo.toml", "rb") as f:
        return tomllib.load(f)["workspace"]["package"]["version"]


def test_images_are_the_ones_make_images_tags_with_the_workspace_version():
    # `make images` tags consensus-node and consensus-operator with the workspace version and
    # no registry serves them: a tag left behind on a version bump would not be found.
    version = workspace_version()
    (deployment,) = documents(ROOT / "operator" / "deployment.yaml")
    images = [c["image"] for c in deployment["spec"]["template"]["spec"]["containers"]]
    assert images == [f"consensus-operator:{version}"]
    (crd,) = documents(CRD_PATH)
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["image"]["default"] == f"consensus-node:{version}"
    # Nothing renames them to a registry on the way (kubectl apply -k).
    for path in kustomizations():
        (kustomization,) = documents(path)
        assert "images" not in kustomization, f"{path.relative_to(ROOT)} renames images"


# What the operator's code does, resource by resource: the controller's watches (list,
# watch), observation (get, list), server-side apply (create on first apply, patch),
# the finalizer (patch), status (patch), Events, volume clean-up and expansion (claims
# patched, the StorageClass read, the StatefulSet deleted orphaning its pods to be applied
# again with the new template), and member restarts (pods deleted). A verb added here
# without code that needs it, or code that needs one missing here, is a mistake.
OPERATOR_PERMISSIONS = {
    ("consensus.dev", "consensusclusters"): {"get", "list", "watch", "patch"},
    ("consensus.dev", "consensusclusters/status"): {"patch"},
    ("consensus.dev", "consensusclusters/finalizers"): {"update"},
    ("consensus.dev", "consensusbackups"): {"list", "watch"},
    ("consensus.dev", "consensusbackups/status"): {"patch"},
    ("consensus.dev", "consensusbackups/finalizers"): {"update"},
    ("apps", "statefulsets"): {"get", "list", "watch", "create", "patch", "delete"},
    ("apps", "statefulsets/scale"): {"patch"},
    ("", "services"): {"get", "list", "watch", "create", "patch"},
    ("", "configmaps"): {"get", "list", "watch", "create", "patch"},
    ("policy", "poddisruptionbudgets"): {"get", "list", "watch", "create", "patch"},
    ("", "pods"): {"list", "delete"},
    ("", "persistentvolumeclaims"): {"get", "list", "create", "patch", "delete"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "delete"},
    ("storage.k8s.io", "storageclasses"): {"get"},
    ("", "nodes"): {"get"},
    ("events.k8s.io", "events"): {"create", "patch"},
}

# kube-lease-manager reads the Lease, creates it once, and renews it by patch; a standby
# watches it (list, watch) to take it the moment its holder gives it up (k8s/leader.rs).
LEADER_ELECTION_PERMISSIONS = {
    ("coordination.k8s.io", "leases"): {"get", "list", "watch", "create", "patch"}
}


def granted(path):
    (role,) = documents(path)
    grants = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                grants.setdefault((group, resource), set()).update(rule["verbs"])
    return grants


def test_cluster_role_grants_exactly_what_the_operator_does():
    assert granted(ROOT / "rbac" / "cluster_role.yaml") == OPERATOR_PERMISSIONS


def test_leader_election_role_grants_exactly_what_the_lease_manager_does():
    assert granted(ROOT / "rbac" / "leader_election_role.yaml") == LEADER_ELECTION_PERMISSIONS


def golden_documents():
    return [
        pytest.param(doc, id=f"{path.name}:{doc['kind']}")
        for path in sorted(GOLDEN.glob("*.yaml"))
        for doc in documents(path)
    ]


@pytest.mark.parametrize("doc", golden_documents())
def test_objects_the_operator_builds_validate_against_kubernetes_schemas(doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_every_sample_has_golden_objects():
    names = {p.name for p in (ROOT / "samples").glob("*.yaml") if p.name != "kustomization.yaml"}
    assert names == {p.name for p in GOLDEN.glob("*.yaml")}
