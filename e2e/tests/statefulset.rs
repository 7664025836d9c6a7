//! Three consensus-node members as a plain StatefulSet, before any operator: the image, the
//! scheduler's zone spread, dynamic volumes, cluster DNS (members find each other by their
//! headless names while not ready yet) and a pod that comes back on its volume. Runs against
//! a KUBECONFIG whose default StorageClass provisions volumes and whose pod addresses this
//! machine reaches (etcdctl talks to each pod): `make e2e-local`; on kind, from a node.

use std::collections::BTreeSet;
use std::time::Duration;

use consensus_e2e::{
    TestNamespace, check_local_containment, etcdctl, etcdctl_try, image, kubectl, kubectl_json, kubectl_ok,
    wait_until,
};

const MEMBERS: usize = 3;

fn manifests(namespace: &str) -> String {
    let peers: Vec<String> = (0..MEMBERS)
        .map(|i| format!("members-{i}=http://members-{i}.members.{namespace}.svc:2380"))
        .collect();
    let initial_cluster = peers.join(",");
    let image = image("consensus-node");
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: members
spec:
  clusterIP: None
  # Members must resolve each other before any of them is ready: bootstrap needs a quorum.
  publishNotReadyAddresses: true
  selector: {{app: members}}
  ports:
    - {{name: client, port: 2379}}
    - {{name: peer, port: 2380}}
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: members
spec:
  serviceName: members
  replicas: {MEMBERS}
  podManagementPolicy: Parallel
  selector:
    matchLabels: {{app: members}}
  template:
    metadata:
      labels: {{app: members}}
    spec:
      enableServiceLinks: false
      automountServiceAccountToken: false
      terminationGracePeriodSeconds: 10
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        runAsGroup: 65532
        fsGroup: 65532
        seccompProfile: {{type: RuntimeDefault}}
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: topology.kubernetes.io/zone
          whenUnsatisfiable: DoNotSchedule
          labelSelector:
            matchLabels: {{app: members}}
      containers:
        - name: member
          image: {image}
          imagePullPolicy: IfNotPresent
          command: [consensus-node]
          args:
            - run
            - --name=$(POD_NAME)
            - --data-dir=/var/lib/consensus/data
            - --listen-client-urls=http://0.0.0.0:2379
            - --advertise-client-urls=http://$(POD_NAME).members.{namespace}.svc:2379
            - --listen-peer-urls=http://0.0.0.0:2380
            - --initial-advertise-peer-urls=http://$(POD_NAME).members.{namespace}.svc:2380
            - --listen-metrics-urls=http://0.0.0.0:2381
            - --initial-cluster={initial_cluster}
            - --initial-cluster-state=new
            - --initial-cluster-token=e2e-statefulset
          env:
            - name: POD_NAME
              valueFrom:
                fieldRef: {{fieldPath: metadata.name}}
          ports:
            - {{name: client, containerPort: 2379}}
            - {{name: peer, containerPort: 2380}}
            - {{name: metrics, containerPort: 2381}}
          readinessProbe:
            httpGet: {{path: /readyz, port: metrics}}
            periodSeconds: 2
          startupProbe:
            httpGet: {{path: /livez, port: metrics}}
            periodSeconds: 2
            failureThreshold: 60
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {{drop: [ALL]}}
          volumeMounts:
            - {{name: data, mountPath: /var/lib/consensus}}
  volumeClaimTemplates:
    - metadata:
        name: data
      spec:
        accessModes: [ReadWriteOnce]
        resources:
          requests: {{storage: 1Gi}}
"#
    )
}

/// A member pod as the API server reports it.
struct Member {
    name: String,
    uid: String,
    ip: String,
    node: String,
    ready: bool,
}

fn members(ns: &str) -> Vec<Member> {
    let pods = kubectl_json(&["-n", ns, "get", "pods", "-l", "app=members"]);
    pods["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|pod| Member {
                    name: pod["metadata"]["name"].as_str().unwrap_or_default().to_owned(),
                    uid: pod["metadata"]["uid"].as_str().unwrap_or_default().to_owned(),
                    ip: pod["status"]["podIP"].as_str().unwrap_or_default().to_owned(),
                    node: pod["spec"]["nodeName"].as_str().unwrap_or_default().to_owned(),
                    ready: pod["status"]["conditions"]
                        .as_array()
                        .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True")),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn all_ready(ns: &str) -> Option<Vec<Member>> {
    let members = members(ns);
    (members.len() == MEMBERS && members.iter().all(|m| m.ready && !m.ip.is_empty())).then_some(members)
}

fn zone_of(node: &str) -> String {
    kubectl_ok(
        &["get", "node", node, "-o", "jsonpath={.metadata.labels.topology\\.kubernetes\\.io/zone}"],
        None,
    )
}

/// The member ids in what `etcdctl member list` printed, by name.
fn parse_member_ids(listed: &str) -> BTreeSet<String> {
    listed
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(", ").collect();
            (fields.len() >= 3).then(|| format!("{}={}", fields[2], fields[0]))
        })
        .collect()
}

fn member_ids(endpoint: &str) -> BTreeSet<String> {
    parse_member_ids(&etcdctl(endpoint, &["member", "list"]))
}

#[test]
#[ignore = "needs a Kubernetes cluster with a default StorageClass: make e2e-local"]
fn a_statefulset_of_members_forms_a_cluster_across_zones_and_a_deleted_pod_returns_to_its_volume() {
    let ns = TestNamespace::create("sts");
    kubectl_ok(&["-n", &ns.0, "apply", "-f", "-"], Some(&manifests(&ns.0)));

    // Three pods, scheduled into three zones, each on a volume of its own, all ready.
    let ready = wait_until(Duration::from_secs(240), "three ready members", || all_ready(&ns.0));
    let zones: BTreeSet<String> = ready.iter().map(|m| zone_of(&m.node)).collect();
    assert_eq!(zones.len(), MEMBERS, "members are not in three zones: {zones:?}");
    let endpoints: Vec<String> = ready.iter().map(|m| format!("http://{}:2379", m.ip)).collect();
    check_local_containment();

    // One cluster of three: every member lists the same three, and a write is read back at
    // every pod address.
    let listed = wait_until(Duration::from_secs(60), "three members listed", || {
        let listed = etcdctl_try(&endpoints[0], &["member", "list"]).ok()?;
        Some(parse_member_ids(&listed)).filter(|ids| ids.len() == MEMBERS)
    });
    for endpoint in &endpoints {
        assert_eq!(member_ids(endpoint), listed, "{endpoint} lists other members");
    }
    etcdctl(&endpoints[0], &["put", "/e2e/greeting", "written-before-the-delete"]);
    for endpoint in &endpoints {
        assert_eq!(
            etcdctl(endpoint, &["get", "--print-value-only", "/e2e/greeting"]).trim(),
            "written-before-the-delete"
        );
    }

    // A deleted pod is re-created by the StatefulSet on the node that holds its volume, with
    // its data: the same member id, the key there before it is asked through the quorum.
    let victim = &ready[1];
    let claim = format!("data-{}", victim.name);
    let volume = kubectl_ok(&["-n", &ns.0, "get", "pvc", &claim, "-o", "jsonpath={.spec.volumeName}"], None);
    kubectl_ok(&["-n", &ns.0, "delete", "pod", &victim.name, "--wait=false"], None);
    let back = wait_until(Duration::from_secs(180), "the deleted member back and ready", || {
        all_ready(&ns.0)?.into_iter().find(|m| m.name == victim.name && m.uid != victim.uid)
    });
    assert_eq!(back.node, victim.node, "the member came back on another node than its volume's");
    let volume_after =
        kubectl_ok(&["-n", &ns.0, "get", "pvc", &claim, "-o", "jsonpath={.spec.volumeName}"], None);
    assert_eq!(volume_after, volume, "the claim is bound to another volume");
    let endpoint = format!("http://{}:2379", back.ip);
    assert_eq!(
        etcdctl(&endpoint, &["get", "--consistency=s", "--print-value-only", "/e2e/greeting"]).trim(),
        "written-before-the-delete",
        "the member lost what it had on its volume"
    );
    assert_eq!(member_ids(&endpoint), listed, "the membership changed");
    etcdctl(&endpoint, &["put", "/e2e/after", "written-after-the-delete"]);
    assert_eq!(
        etcdctl(&endpoints[0], &["get", "--print-value-only", "/e2e/after"]).trim(),
        "written-after-the-delete"
    );
    let _ = kubectl(&["-n", &ns.0, "delete", "statefulset", "members", "--wait=false"], None);
}
