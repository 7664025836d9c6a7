//! Reconcile scenarios against a fake API server: each test reads as the list of
//! requests the operator makes, then checks the ones that matter (field manager, force,
//! body).

mod support;

use std::sync::Arc;

use consensus_crds::{ConsensusCluster, FIELD_MANAGER, STATUS_FIELD_MANAGER};
use consensus_operator::k8s::events::Events;
use consensus_operator::k8s::metrics::Metrics;
use consensus_operator::k8s::reconcile::{Context, FINALIZER, converge_with, reconcile};
use consensus_operator::plan::Step;
use consensus_operator::resources::{Guarded, InitialClusterState, Members};
use kube::Client;
use kube::runtime::events::Reporter;
use serde_json::{Value, json};
use support::members::{CLUSTER_ID, Cluster, FakeMembers, Member};
use support::{
    BACKUPS, CC, CONFIG, EVENTS, FakeApi, JOBS, NS, PDB, PODS, PVCS, Recorded, STS, applied_objects,
    assert_allowed_by_cluster_role, only,
};

const PEER: &str = "/api/v1/namespaces/default/services/demo-peer";
const CLIENT: &str = "/api/v1/namespaces/default/services/demo-client";

/// `demo-0` .. `demo-{n-1}`, all answering, `demo-0` leading.
fn healthy(n: u64) -> FakeMembers {
    FakeMembers::answering(Cluster { members: members(n), leader: Some(0x10) })
}

fn members(n: u64) -> Vec<Member> {
    (0..n)
        .map(|i| Member {
            id: 0x10 + i,
            name: format!("demo-{i}"),
            is_learner: false,
            started: true,
            answers: true,
            applied_index: 42,
            raft_index: 42,
        })
        .collect()
}

/// The members' own client URLs, under the headless peer Service.
fn member_urls(n: u64) -> Vec<String> {
    (0..n).map(|i| format!("http://demo-{i}.demo-peer.default.svc:2379")).collect()
}

fn cluster(spec: Value, finalizer: bool) -> ConsensusCluster {
    serde_json::from_value(json!({
        "apiVersion": "consensus.dev/v1alpha1",
        "kind": "ConsensusCluster",
        "metadata": {
            "name": "demo", "namespace": NS, "uid": "11111111-2222-4333-8444-555555555555",
            "generation": 2, "resourceVersion": "7",
            "finalizers": if finalizer { json!([FINALIZER]) } else { Value::Null },
        },
        "spec": spec,
    }))
    .expect("a ConsensusCluster")
}

fn context(client: Client, members: FakeMembers) -> Arc<Context<FakeMembers>> {
    let reporter =
        Reporter { controller: "consensus-operator".into(), instance: Some("consensus-operator-0".into()) };
    Arc::new(Context {
        recorder: Events::new(client.clone(), reporter),
        client,
        members,
        metrics: Metrics::shared(),
    })
}

/// The objects of a running 3-member cluster, as the operator applied them: with `new`
/// while no member had answered (so no voter was known to spare), `existing` once three
/// voters had.
fn running_cluster_objects(cc: &ConsensusCluster, state: InitialClusterState) -> Vec<Value> {
    let voters = (state == InitialClusterState::Existing).then_some(3);
    let guarded = Guarded { pods: 3, voters };
    let mut objects = applied_objects(cc, Members { replicas: 3, state, guarded });
    for (i, zone) in ["zone-a", "zone-b", "zone-c"].iter().enumerate() {
        objects.push(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("demo-{i}"), "namespace": NS,
                         "labels": {"app.kubernetes.io/name": "consensus-node", "app.kubernetes.io/instance": "demo"}},
            "spec": {"nodeName": format!("node-{i}"), "containers": []},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        }));
        objects.push(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": format!("node-{i}"), "labels": {"topology.kubernetes.io/zone": zone}},
        }));
    }
    objects
}

fn with_cluster(cc: &ConsensusCluster, mut objects: Vec<Value>) -> Vec<Value> {
    objects.push(serde_json::to_value(cc).expect("serializes"));
    objects
}

fn events(requests: &[Recorded]) -> Vec<(String, String, String)> {
    requests
        .iter()
        .filter(|r| r.method == "POST" && r.path == EVENTS)
        .map(|r| {
            let text = |field: &str| r.body[field].as_str().unwrap_or_default().to_owned();
            (text("type"), text("reason"), text("note"))
        })
        .collect()
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

#[tokio::test]
async fn a_new_cluster_gets_the_finalizer_before_anything_is_created() {
    let cc = cluster(json!({"replicas": 3}), false);
    let (client, api) = FakeApi::start(with_cluster(&cc, vec![]));

    reconcile(Arc::new(cc), context(client, FakeMembers::unreachable())).await.expect("reconciles");

    assert_eq!(api.story(), [format!("PATCH {CC}")]);
    let patch = &api.requests()[0];
    assert_eq!(patch.content_type, "application/json-patch+json");
    assert_eq!(
        patch.body,
        json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
        ])
    );
}

#[tokio::test]
async fn the_first_reconcile_creates_every_object_and_reports_pending() {
    let cc = cluster(json!({"replicas": 3, "storage": {"size": "2Gi"}}), true);
    let (client, api) = FakeApi::start(with_cluster(&cc, vec![]));
    let ctx = context(client, FakeMembers::unreachable());

    reconcile(Arc::new(cc), ctx.clone()).await.expect("reconciles");

    // Looks at what exists (backup runs, volumes an earlier cluster of this name left, pods
    // a deleted StatefulSet left running), then applies configuration, Services, budget and
    // StatefulSet, each followed by its event, and finally reports status.
    assert_eq!(
        api.story(),
        [
            format!("GET {JOBS}"),
            format!("GET {PODS}"),
            format!("GET {BACKUPS}"),
            format!("GET {STS}"),
            format!("GET {CONFIG}"),
            format!("GET {PEER}"),
            format!("GET {CLIENT}"),
            format!("GET {PDB}"),
            format!("GET {PVCS}"),
            format!("GET {PODS}"),
            format!("PATCH {CONFIG}"),
            format!("POST {EVENTS}"),
            format!("PATCH {PEER}"),
            format!("POST {EVENTS}"),
            format!("PATCH {CLIENT}"),
            format!("POST {EVENTS}"),
            format!("PATCH {PDB}"),
            format!("POST {EVENTS}"),
            format!("PATCH {STS}"),
            format!("POST {EVENTS}"),
            format!("PATCH {CC}/status"),
        ]
    );
    let requests = api.requests();
    for path in [CONFIG, PEER, CLIENT, PDB, STS] {
        let apply = only(&requests, "PATCH", path);
        assert!(apply.is_apply(), "{path} is applied server-side");
        assert_eq!(apply.field_manager(), Some(FIELD_MANAGER), "{path}");
        assert!(apply.forced(), "{path} is applied with force");
        let owner = &apply.body["metadata"]["ownerReferences"][0];
        assert_eq!(
            (owner["kind"].as_str(), owner["name"].as_str()),
            (Some("ConsensusCluster"), Some("demo"))
        );
        assert_eq!(owner["controller"], true, "{path}: deleting the cluster deletes it");
    }

    let sts = &only(&requests, "PATCH", STS).body;
    assert_eq!(sts["spec"]["replicas"], 3);
    assert_eq!(sts["spec"]["podManagementPolicy"], "Parallel");
    assert_eq!(sts["spec"]["serviceName"], "demo-peer");
    assert_eq!(sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"], "2Gi");
    let config = &only(&requests, "PATCH", CONFIG).body;
    assert_eq!(config["data"]["initial-cluster-state"], "new", "the first members bootstrap together");
    assert_eq!(
        config["data"]["initial-cluster"],
        "demo-0=http://demo-0.demo-peer.default.svc:2380,\
         demo-1=http://demo-1.demo-peer.default.svc:2380,\
         demo-2=http://demo-2.demo-peer.default.svc:2380"
    );
    assert_eq!(only(&requests, "PATCH", PEER).body["spec"]["publishNotReadyAddresses"], true);
    // No member has answered, so no voter is known to be spare: no eviction yet.
    let budget = &only(&requests, "PATCH", PDB).body["spec"];
    assert_eq!((&budget["minAvailable"], &budget["maxUnavailable"]), (&json!(3), &Value::Null));
    assert_eq!(budget["unhealthyPodEvictionPolicy"], "IfHealthyBudget");

    let created: Vec<_> = events(&requests).into_iter().map(|(t, r, n)| format!("{t} {r}: {n}")).collect();
    assert_eq!(
        created,
        [
            "Normal Created: created ConfigMap demo-config",
            "Normal Created: created Service demo-peer",
            "Normal Created: created Service demo-client",
            "Normal Created: created PodDisruptionBudget demo",
            "Normal Created: created StatefulSet demo",
        ]
    );

    let status_patch = only(&requests, "PATCH", &format!("{CC}/status"));
    assert!(status_patch.is_apply());
    assert_eq!(status_patch.field_manager(), Some(STATUS_FIELD_MANAGER));
    assert!(status_patch.forced());
    let status = &status_patch.body["status"];
    assert_eq!(status_patch.body["kind"], "ConsensusCluster");
    assert_eq!(status["phase"], "Pending");
    assert_eq!(status["observedGeneration"], 2);
    assert_eq!(status["selector"], "app.kubernetes.io/instance=demo,app.kubernetes.io/name=consensus-node");
    assert_eq!(condition(status, "Progressing")["status"], "True");

    // Nothing ran yet, so there was nobody to ask.
    assert!(ctx.members.asked().is_empty());
}

#[tokio::test]
async fn an_even_replica_count_is_refused_and_the_cluster_is_left_as_it_is() {
    let running = cluster(json!({"replicas": 3}), true);
    let objects = running_cluster_objects(&running, InitialClusterState::Existing);
    let cc = cluster(json!({"replicas": 4}), true);
    let (client, api) = FakeApi::start(with_cluster(&cc, objects));

    reconcile(Arc::new(cc), context(client, healthy(3))).await.expect("reconciles");

    // Writes: one Warning event and the status, nothing else.
    let writes: Vec<String> = api.writes().iter().map(Recorded::line).collect();
    assert_eq!(writes, [format!("POST {EVENTS}"), format!("PATCH {CC}/status")]);
    assert!(
        api.requests().iter().all(|r| r.path != STS || r.method == "GET"),
        "the StatefulSet is not written"
    );
    assert_eq!(api.object(STS).expect("still there")["spec"]["replicas"], 3);

    let requests = api.requests();
    let (type_, reason, note) = events(&requests).remove(0);
    assert_eq!((type_.as_str(), reason.as_str()), ("Warning", "InvalidSpec"));
    assert!(note.contains("spec.replicas: 4 is not allowed"), "{note}");

    let status_patch = only(&requests, "PATCH", &format!("{CC}/status"));
    assert_eq!(status_patch.field_manager(), Some(STATUS_FIELD_MANAGER));
    let status = &status_patch.body["status"];
    let degraded = condition(status, "Degraded");
    assert_eq!(
        (degraded["status"].as_str(), degraded["reason"].as_str()),
        (Some("True"), Some("InvalidSpec"))
    );
    assert_eq!(degraded["observedGeneration"], 2);
    assert_eq!(status["phase"], "Degraded");
    // The members still serve, and status still says so.
    assert_eq!(status["leader"], "demo-0");
    assert_eq!(status["readyReplicas"], 3);
}

#[tokio::test]
async fn a_steady_cluster_reports_members_zones_and_leader_under_the_status_field_manager() {
    let cc = cluster(json!({"replicas": 3}), true);
    let objects = running_cluster_objects(&cc, InitialClusterState::Existing);
    let (client, api) = FakeApi::start(with_cluster(&cc, objects));
    let ctx = context(client, healthy(3));

    reconcile(Arc::new(cc), ctx.clone()).await.expect("reconciles");

    // Each member on its own address, not the client Service (`demo-client`), which has no
    // endpoint exactly when the members' word matters most (bootstrap, quorum loss).
    assert_eq!(ctx.members.asked(), member_urls(3));
    assert!(ctx.members.changes().is_empty(), "a steady cluster's membership is left alone");
    let requests = api.requests();
    // Every object is applied again (level-triggered), but nothing changed: no events.
    assert!(events(&requests).is_empty(), "{:?}", events(&requests));
    for apply in requests.iter().filter(|r| r.is_apply() && !r.path.ends_with("/status")) {
        assert_eq!(apply.field_manager(), Some(FIELD_MANAGER), "{}", apply.path);
    }
    assert!(requests.iter().any(|r| r.line() == format!("GET {PODS}")), "pods are listed for readiness");

    let status_patch = only(&requests, "PATCH", &format!("{CC}/status"));
    assert_eq!(status_patch.field_manager(), Some(STATUS_FIELD_MANAGER));
    assert!(status_patch.forced());
    let status = &status_patch.body["status"];
    assert_eq!(status["phase"], "Running");
    assert_eq!(status["leader"], "demo-0");
    assert_eq!(status["readyReplicas"], 3);
    assert_eq!(status["replicas"], 3);
    let members = status["members"].as_array().expect("members");
    let described: Vec<String> = members
        .iter()
        .map(|m| format!("{} {} {} {} {}", m["name"], m["id"], m["role"], m["zone"], m["healthy"]))
        .collect();
    assert_eq!(
        described,
        [
            r#""demo-0" "10" "Leader" "zone-a" true"#,
            r#""demo-1" "11" "Follower" "zone-b" true"#,
            r#""demo-2" "12" "Follower" "zone-c" true"#,
        ]
    );
    assert_eq!(condition(status, "Available")["status"], "True");
    assert_eq!(status["clusterId"], format!("{CLUSTER_ID:x}"));
}

/// The pods of `running_cluster_objects`, none of them ready: no endpoint behind the
/// client Service, as while members elect their first leader or after quorum is lost.
fn not_ready(mut objects: Vec<Value>) -> Vec<Value> {
    for pod in objects.iter_mut().filter(|o| o["kind"] == "Pod") {
        pod["status"]["conditions"] = json!([{"type": "Ready", "status": "False"}]);
    }
    objects
}

#[tokio::test]
async fn members_that_answer_without_a_leader_are_in_status_while_they_bootstrap() {
    let cc = cluster(json!({"replicas": 3}), true);
    let objects = not_ready(running_cluster_objects(&cc, InitialClusterState::New));
    let (client, api) = FakeApi::start(with_cluster(&cc, objects));
    let ctx = context(client, FakeMembers::answering(Cluster { members: members(3), leader: None }));

    reconcile(Arc::new(cc), ctx.clone()).await.expect("reconciles");

    assert_eq!(ctx.members.asked(), member_urls(3));
    let requests = api.requests();
    let status = &only(&requests, "PATCH", &format!("{CC}/status")).body["status"];
    assert_eq!(status["phase"], "Bootstrapping");
    let members: Vec<String> = status["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| format!("{} {} {}", m["name"], m["role"], m["healthy"]))
        .collect();
    assert_eq!(
        members,
        [r#""demo-0" "Follower" false"#, r#""demo-1" "Follower" false"#, r#""demo-2" "Follower" false"#]
    );
    assert_eq!(status["leader"], Value::Null);
    assert_eq!(only(&requests, "PATCH", CONFIG).body["data"]["initial-cluster-state"], "new");
}

#[tokio::test]
async fn members_that_lost_quorum_are_in_status_as_they_answer() {
    // Established (demo-0 led before), then two of three stopped answering: the one left
    // answers without a leader, and the silent ones are listed as its MemberList has them.
    let mut cc = cluster(json!({"replicas": 3}), true);
    cc.status =
        Some(serde_json::from_value(json!({"phase": "Running", "leader": "demo-0"})).expect("status"));
    let objects = not_ready(running_cluster_objects(&cc, InitialClusterState::Existing));
    let (client, api) = FakeApi::start(with_cluster(&cc, objects));
    let mut left = members(3);
    for member in &mut left[1..] {
        member.answers = false;
    }
    let ctx = context(client, FakeMembers::answering(Cluster { members: left, leader: None }));

    reconcile(Arc::new(cc), ctx.clone()).await.expect("reconciles");

    let requests = api.requests();
    let status = &only(&requests, "PATCH", &format!("{CC}/status")).body["status"];
    assert_eq!(status["phase"], "QuorumLost");
    let names: Vec<&str> =
        status["members"].as_array().expect("members").iter().filter_map(|m| m["name"].as_str()).collect();
    assert_eq!(names, ["demo-0", "demo-1", "demo-2"]);
    assert_eq!(condition(status, "QuorumLost")["status"], "True");
    // Told at once, as a Warning naming what is missing; the metric says since when.
    let warning = events(&requests).into_iter().find(|(_, reason, _)| reason == "QuorumLost");
    let (type_, _, note) = warning.expect("a QuorumLost event");
    assert_eq!(type_, "Warning");
    assert!(note.contains("0 of 3 voters are healthy and no leader is known"), "{note}");
    let metrics = ctx.metrics.render();
    assert!(
        metrics.contains(r#"consensus_operator_quorum_lost_since_timestamp_seconds{cluster="default/demo"}"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_status_that_is_already_there_is_not_written_again() {
    let mut cc = cluster(json!({"replicas": 3}), true);
    let objects = running_cluster_objects(&cc, InitialClusterState::Existing);
    let (client, api) = FakeApi::start(with_cluster(&cc, objects.clone()));
    reconcile(Arc::new(cc.clone()), context(client, healthy(3))).await.expect("reconciles");
    let written = only(&api.requests(), "PATCH", &format!("{CC}/status")).body["status"].clone();

    // The next reconcile (a requeue, the members busy with writes) sees its own status.
    cc.status = Some(serde_json::from_value(written).expect("a status"));
    let (client, api) = FakeApi::start(with_cluster(&cc, objects));
    let mut busy = members(3);
    for (member, applied) in busy.iter_mut().zip([9000, 8990, 8950]) {
        member.applied_index = applied;
        member.raft_index = 9000;
    }
    let busy = FakeMembers::answering(Cluster { members: busy, leader: Some(0x10) });
    reconcile(Arc::new(cc), context(client, busy)).await.expect("reconciles");

    let writes: Vec<String> = api.writes().iter().map(Recorded::line).collect();
    assert!(!writes.contains(&format!("PATCH {CC}/status")), "status written again: {writes:?}");
}

#[tokio::test]
async fn a_status_write_of_the_statefulset_controller_is_no_update_of_ours() {
    let cc = cluster(json!({"replicas": 3}), true);
    let objects = running_cluster_objects(&cc, InitialClusterState::Existing);
    let (client, api) = FakeApi::start(with_cluster(&cc, objects));
    // Between the operator's look at the StatefulSet and its apply, the StatefulSet
    // controller counts the ready pods, which moves the resourceVersion.
    api.meanwhile(&format!("GET {PODS}"), STS, json!({"replicas": 3, "readyReplicas": 3}));

    reconcile(Arc::new(cc), context(client, healthy(3))).await.expect("reconciles");

    assert!(api.object(STS).expect("sts")["status"]["readyReplicas"] == 3, "the controller wrote status");
    assert!(events(&api.requests()).is_empty(), "{:?}", events(&api.requests()));
}

#[tokio::test]
async fn a_failed_event_publish_neither_stops_the_applies_nor_the_status() {
    let cc = cluster(json!({"replicas": 3}), true);
    let (client, api) = FakeApi::start(with_cluster(&cc, vec![]));
    api.refuse("POST", EVENTS, 403);

    let result = reconcile(Arc::new(cc), context(client, FakeMembers::unreachable())).await;

    // Counted as failed (and retried), with the cause the metric names.
    assert_eq!(result.expect_err("the reconcile fails").metric_label(), "event");
    let writes: Vec<String> = api.writes().iter().filter(|r| r.path != EVENTS).map(Recorded::line).collect();
    assert_eq!(
        writes,
        [CONFIG, PEER, CLIENT, PDB, STS, &format!("{CC}/status")].map(|path| format!("PATCH {path}"))
    );
}

#[tokio::test]
async fn a_refused_membership_change_is_in_status_and_an_event() {
    let cc = cluster(json!({"replicas": 3}), true);
    let objects = running_cluster_objects(&cc, InitialClusterState::Existing);
    let (client, api) = FakeApi::start(with_cluster(&cc, objects));
    let ctx = context(client, healthy(3).refusing());

    let result = converge_with(&cc, &ctx, |_| Step::TransferLeadership { to: 0x11 }).await;

    assert_eq!(result.expect_err("the reconcile fails").metric_label(), "membership");
    let requests = api.requests();
    let reported: Vec<_> = events(&requests).into_iter().map(|(t, r, _)| format!("{t} {r}")).collect();
    assert_eq!(reported, ["Warning MembershipChangeFailed"]);
    let status = &only(&requests, "PATCH", &format!("{CC}/status")).body["status"];
    let progressing = condition(status, "Progressing");
    assert_eq!(
        (progressing["status"].as_str(), progressing["reason"].as_str()),
        (Some("False"), Some("StepFailed"))
    );
    let message = progressing["message"].as_str().expect("message");
    assert!(
        message.starts_with("TransferLeadership failed and is retried: ")
            && message.contains("not caught up"),
        "{message}"
    );
    assert_eq!(status["leader"], "demo-0", "the rest of status is what was observed");
}

#[tokio::test]
async fn once_a_leader_is_seen_new_members_join_instead_of_bootstrapping() {
    let cc = cluster(json!({"replicas": 3}), true);
    let objects = running_cluster_objects(&cc, InitialClusterState::New);
    let (client, api) = FakeApi::start(with_cluster(&cc, objects));

    reconcile(Arc::new(cc), context(client, healthy(3))).await.expect("reconciles");

    let requests = api.requests();
    assert_eq!(only(&requests, "PATCH", CONFIG).body["data"]["initial-cluster-state"], "existing");
    // Three voters answer for the first time: one of them can be spared now.
    assert_eq!(only(&requests, "PATCH", PDB).body["spec"]["minAvailable"], 2);
    let reported: Vec<_> = events(&requests).into_iter().map(|(_, r, n)| format!("{r}: {n}")).collect();
    assert_eq!(
        reported,
        ["Updated: updated ConfigMap demo-config", "Updated: updated PodDisruptionBudget demo"]
    );
}

#[tokio::test]
async fn while_members_bootstrap_the_configuration_stays_new() {
    let cc = cluster(json!({"replicas": 3}), true);
    let objects = running_cluster_objects(&cc, InitialClusterState::New);
    let (client, api) = FakeApi::start(with_cluster(&cc, objects));

    reconcile(Arc::new(cc), context(client, FakeMembers::unreachable())).await.expect("reconciles");

    let requests = api.requests();
    assert_eq!(only(&requests, "PATCH", CONFIG).body["data"]["initial-cluster-state"], "new");
    assert!(events(&requests).is_empty());
    let status = &only(&requests, "PATCH", &format!("{CC}/status")).body["status"];
    assert_eq!(condition(status, "Available")["status"], "False");
}

fn deleted(spec: Value) -> ConsensusCluster {
    let mut cc = cluster(spec, true);
    cc.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
    cc
}

fn volumes() -> Vec<Value> {
    (0..3)
        .map(|i| {
            json!({
                "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": format!("data-demo-{i}"), "namespace": NS,
                             "labels": {"app.kubernetes.io/name": "consensus-node", "app.kubernetes.io/instance": "demo"}},
            })
        })
        .collect()
}

#[tokio::test]
async fn deleting_a_cluster_keeps_its_volumes_by_default_and_says_so() {
    let cc = deleted(json!({"replicas": 3}));
    // A ConsensusBackup's run, which the request owns: it goes with the cluster it takes.
    let mut objects = volumes();
    objects.push(json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "before-upgrade-backup-1", "namespace": NS, "labels": {
            "app.kubernetes.io/name": "consensus-backup", "app.kubernetes.io/instance": "demo",
            "app.kubernetes.io/component": "backup", "app.kubernetes.io/managed-by": "consensus-operator"}},
    }));
    let (client, api) = FakeApi::start(with_cluster(&cc, objects));

    reconcile(Arc::new(cc), context(client, FakeMembers::unreachable())).await.expect("reconciles");

    assert_eq!(
        api.story(),
        [
            format!("GET {JOBS}"),
            format!("DELETE {JOBS}/before-upgrade-backup-1"),
            format!("GET {PVCS}"),
            format!("POST {EVENTS}"),
            format!("PATCH {CC}")
        ]
    );
    let requests = api.requests();
    let (_, reason, note) = events(&requests).remove(0);
    assert_eq!(reason, "VolumesRetained");
    assert!(note.contains("data-demo-0, data-demo-1, data-demo-2"), "{note}");
    let remove = &requests[4].body;
    assert_eq!(remove[1], json!({"op": "remove", "path": "/metadata/finalizers/0"}));
}

#[tokio::test]
async fn deleting_a_cluster_with_reclaim_policy_delete_deletes_its_volumes() {
    let cc = deleted(json!({"replicas": 3, "storage": {"reclaimPolicy": "Delete"}}));
    let (client, api) = FakeApi::start(with_cluster(&cc, volumes()));

    reconcile(Arc::new(cc), context(client, FakeMembers::unreachable())).await.expect("reconciles");

    assert_eq!(
        api.story(),
        [
            format!("GET {JOBS}"),
            format!("GET {PVCS}"),
            format!("DELETE {PVCS}/data-demo-0"),
            format!("DELETE {PVCS}/data-demo-1"),
            format!("DELETE {PVCS}/data-demo-2"),
            format!("POST {EVENTS}"),
            format!("PATCH {CC}"),
        ]
    );
    assert_eq!(events(&api.requests())[0].1, "VolumesDeleted");
}

#[tokio::test]
async fn the_operator_refuses_to_start_without_its_crd() {
    const ALL: &str = "/apis/consensus.dev/v1alpha1/consensusclusters";
    let (client, _api) = FakeApi::start(vec![]);
    consensus_operator::k8s::require_crd(&client).await.expect("served");

    let (client, api) = FakeApi::start(vec![]);
    api.refuse("GET", ALL, 404);
    let error = consensus_operator::k8s::require_crd(&client).await.expect_err("no CRD");
    let message = format!("{error:#}");
    assert!(message.contains("consensusclusters.consensus.dev is not installed"), "{message}");
    assert!(message.contains("kubectl apply -k manifests/"), "{message}");
    assert_eq!(api.requests()[0].query.get("limit").map(String::as_str), Some("1"), "one object is enough");
}

/// The claims of a running 3-member cluster, each `size`, in StorageClass `local`, which
/// allows expansion as `expandable` says.
fn claims(size: &str, expandable: bool) -> Vec<Value> {
    let mut objects: Vec<Value> = (0..3)
        .map(|i| {
            json!({
                "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": format!("data-demo-{i}"), "namespace": NS,
                             "labels": {"app.kubernetes.io/name": "consensus-node", "app.kubernetes.io/instance": "demo"}},
                "spec": {"storageClassName": "local", "resources": {"requests": {"storage": size}}},
            })
        })
        .collect();
    objects.push(json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": "local"}, "provisioner": "example.com/local", "allowVolumeExpansion": expandable,
    }));
    objects
}

/// A running 3-member cluster made from `before`, reconciled with `after`'s spec.
async fn edited(before: Value, after: Value, expandable: bool) -> Vec<Recorded> {
    let running = cluster(before, true);
    let mut objects = running_cluster_objects(&running, InitialClusterState::Existing);
    objects.extend(claims("1Gi", expandable));
    let cc = cluster(after, true);
    let (client, api) = FakeApi::start(with_cluster(&cc, objects));
    reconcile(Arc::new(cc), context(client, healthy(3))).await.expect("reconciles");
    api.requests()
}

#[tokio::test]
async fn a_larger_size_patches_each_claim_then_re_creates_the_statefulset_around_its_pods() {
    let requests =
        edited(json!({"replicas": 3}), json!({"replicas": 3, "storage": {"size": "2Gi"}}), true).await;

    for i in 0..3 {
        let patch = only(&requests, "PATCH", &format!("{PVCS}/data-demo-{i}"));
        assert_eq!(patch.content_type, "application/merge-patch+json");
        assert_eq!(patch.body, json!({"spec": {"resources": {"requests": {"storage": "2Gi"}}}}));
    }
    // Deleted with its pods orphaned, so they run on; applied again on the next round, with
    // the new template (an apply now would meet the immutable template and a 422).
    let delete = only(&requests, "DELETE", STS);
    assert_eq!(delete.body["propagationPolicy"], "Orphan");
    assert!(!requests.iter().any(|r| r.is_apply() && r.path == STS), "the StatefulSet was applied");
    let reported = events(&requests);
    let resized = reported.iter().find(|(_, reason, _)| reason == "VolumesResized").expect("an event");
    assert!(resized.2.contains("requested 2Gi for data-demo-0, data-demo-1, data-demo-2"), "{}", resized.2);
    assert_allowed_by_cluster_role(&requests);
}

#[tokio::test]
async fn without_the_stateful_set_the_workload_is_as_large_as_its_orphaned_pods_say() {
    let running = cluster(json!({"replicas": 3}), true);
    let mut objects = running_cluster_objects(&running, InitialClusterState::Existing);
    objects.retain(|o| o["kind"] != "StatefulSet");
    let cc = cluster(json!({"replicas": 3, "storage": {"size": "2Gi"}}), true);
    let (client, api) = FakeApi::start(with_cluster(&cc, objects));

    reconcile(Arc::new(cc), context(client, healthy(3))).await.expect("reconciles");

    let requests = api.requests();
    let applied = only(&requests, "PATCH", STS);
    assert_eq!(applied.body["spec"]["replicas"], 3);
    assert_eq!(
        applied.body["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"],
        "2Gi"
    );
    assert_eq!(only(&requests, "PATCH", CONFIG).body["data"]["initial-cluster-state"], "existing");
}

#[tokio::test]
async fn a_larger_size_waits_while_a_member_is_down_and_the_template_stays() {
    let running = cluster(json!({"replicas": 3}), true);
    let mut objects = running_cluster_objects(&running, InitialClusterState::Existing);
    objects.extend(claims("1Gi", true));
    // demo-2's pod is not Ready (restarting): re-made now, the StatefulSet would take its
    // size from the pods that run.
    for pod in objects.iter_mut().filter(|o| o["kind"] == "Pod" && o["metadata"]["name"] == "demo-2") {
        pod["status"]["conditions"] = json!([{"type": "Ready", "status": "False"}]);
    }
    let cc = cluster(json!({"replicas": 3, "storage": {"size": "2Gi"}}), true);
    let (client, api) = FakeApi::start(with_cluster(&cc, objects));

    reconcile(Arc::new(cc), context(client, healthy(3))).await.expect("reconciles");

    let requests = api.requests();
    assert!(!requests.iter().any(|r| r.method == "DELETE" || r.path.starts_with(&format!("{PVCS}/"))));
    let template = &only(&requests, "PATCH", STS).body["spec"]["volumeClaimTemplates"][0]["spec"];
    assert_eq!(template["resources"]["requests"]["storage"], "1Gi", "the template changed: {template}");
}

#[tokio::test]
async fn a_class_change_is_refused_and_said_while_the_rest_of_the_spec_still_applies() {
    let requests = edited(
        json!({"replicas": 3}),
        json!({"replicas": 3, "storage": {"storageClassName": "fast"}, "podTemplate": {"labels": {"team": "a"}}}),
        true,
    )
    .await;

    let applied = only(&requests, "PATCH", STS);
    let template = &applied.body["spec"]["volumeClaimTemplates"][0]["spec"];
    assert_eq!(template["storageClassName"], Value::Null, "the volume template changed: {template}");
    assert_eq!(template["resources"]["requests"]["storage"], "1Gi");
    assert_eq!(applied.body["spec"]["template"]["metadata"]["labels"]["team"], "a", "the rest is applied");
    assert!(!requests.iter().any(|r| r.method == "DELETE" || r.path.starts_with(&format!("{PVCS}/"))));
    let refused = events(&requests).into_iter().find(|(_, reason, _)| reason == "StorageChangeRefused");
    let (type_, _, note) = refused.expect("a StorageChangeRefused event");
    assert_eq!(type_, "Warning");
    assert!(note.contains("from the default class to \"fast\""), "{note}");
    let status = &only(&requests, "PATCH", &format!("{CC}/status")).body["status"];
    assert_eq!(condition(status, "Degraded")["reason"], "ChangeRefused");
    assert_eq!(status["observedGeneration"], 2);
}

#[tokio::test]
async fn a_larger_size_in_a_class_without_expansion_is_refused() {
    let requests =
        edited(json!({"replicas": 3}), json!({"replicas": 3, "storage": {"size": "2Gi"}}), false).await;
    assert!(!requests.iter().any(|r| r.method == "DELETE"), "nothing is deleted");
    let status = &only(&requests, "PATCH", &format!("{CC}/status")).body["status"];
    let degraded = condition(status, "Degraded");
    assert_eq!(degraded["reason"], "ChangeRefused");
    assert!(degraded["message"].as_str().unwrap_or_default().contains("does not allow volume expansion"));
}

#[tokio::test]
async fn a_member_on_an_old_template_is_restarted_by_deleting_its_pod_as_observed() {
    let cc = cluster(json!({"replicas": 3}), true);
    let objects = running_cluster_objects(&cc, InitialClusterState::Existing);
    let (client, api) = FakeApi::start(with_cluster(&cc, objects));
    let uid = api.object(&format!("{PODS}/demo-1")).expect("pod")["metadata"]["uid"].clone();
    let ctx = context(client, healthy(3));

    converge_with(&cc, &ctx, |_| Step::UpdateMember { name: "demo-1".into() }).await.expect("reconciles");

    let requests = api.requests();
    let delete = only(&requests, "DELETE", &format!("{PODS}/demo-1"));
    // A pod made since (the StatefulSet's own) is not deleted again.
    assert_eq!(delete.body["preconditions"]["uid"], uid);
    let updated = events(&requests).into_iter().find(|(_, reason, _)| reason == "MemberUpdated");
    assert!(updated.is_some_and(|(_, _, note)| note.contains("demo-1")));
    assert_allowed_by_cluster_role(&requests);
}

#[tokio::test]
async fn a_cluster_whose_id_is_in_status_is_created_again_to_join_never_to_bootstrap() {
    let mut cc = cluster(json!({"replicas": 3}), true);
    cc.status = Some(serde_json::from_value(json!({"clusterId": "c1"})).expect("a status"));
    let (client, api) = FakeApi::start(with_cluster(&cc, vec![]));

    reconcile(Arc::new(cc), context(client, FakeMembers::unreachable())).await.expect("reconciles");

    assert_eq!(only(&api.requests(), "PATCH", CONFIG).body["data"]["initial-cluster-state"], "existing");
}

#[tokio::test]
async fn volumes_older_than_the_resource_are_refused_and_nothing_is_created() {
    let mut cc = cluster(json!({"replicas": 3}), true);
    cc.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).expect("a time"),
    ));
    let mut kept = volumes();
    for claim in &mut kept {
        claim["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
    }
    // The earlier cluster's pods still run (it was deleted with its dependents orphaned):
    // a StatefulSet applied for them would start members on its volumes all the same.
    let orphans = running_cluster_objects(&cc, InitialClusterState::Existing);
    kept.extend(orphans.into_iter().filter(|o| o["kind"] == "Pod" || o["kind"] == "Node"));
    let (client, api) = FakeApi::start(with_cluster(&cc, kept));

    reconcile(Arc::new(cc), context(client, FakeMembers::unreachable())).await.expect("reconciles");

    let requests = api.requests();
    let changes: Vec<String> = requests.iter().filter(|r| r.method != "GET").map(Recorded::line).collect();
    assert_eq!(changes, [format!("PATCH {CC}/status")], "only the status is written");
    let status = &requests.last().expect("requests").body["status"];
    let degraded = condition(status, "Degraded");
    assert_eq!(degraded["reason"], "KeptVolumes");
    assert!(
        degraded["message"].as_str().unwrap_or_default().contains("data-demo-0, data-demo-1, data-demo-2")
    );
}

/// Every request of every scenario above is one the operator's ClusterRole allows.
#[tokio::test]
async fn the_cluster_role_allows_every_request_the_reconciler_makes() {
    let mut requests = Vec::new();
    let running = cluster(json!({"replicas": 3}), true);
    for (cc, objects, members) in [
        (cluster(json!({"replicas": 3}), false), vec![], FakeMembers::unreachable()),
        (running.clone(), vec![], FakeMembers::unreachable()),
        (running.clone(), running_cluster_objects(&running, InitialClusterState::New), healthy(3)),
        (
            cluster(json!({"replicas": 4}), true),
            running_cluster_objects(&running, InitialClusterState::New),
            healthy(3),
        ),
        (deleted(json!({"storage": {"reclaimPolicy": "Delete"}})), volumes(), FakeMembers::unreachable()),
    ] {
        let (client, api) = FakeApi::start(with_cluster(&cc, objects));
        reconcile(Arc::new(cc), context(client, members)).await.expect("reconciles");
        requests.extend(api.requests());
    }
    assert_allowed_by_cluster_role(&requests);
}

/// A scale-up and the scale-down after it are two stories, not "x2" of the first: an Event
/// is counted again only when it says the same thing again.
#[tokio::test]
async fn events_fold_only_when_their_note_repeats() {
    let cc = cluster(json!({"replicas": 3}), true);
    let (client, api) = FakeApi::start(with_cluster(&cc, vec![]));
    let ctx = context(client, FakeMembers::unreachable());
    let voters = |note: &str| kube::runtime::events::Event {
        type_: kube::runtime::events::EventType::Normal,
        reason: "VotersChanged".into(),
        note: Some(note.into()),
        action: "ChangeVoters".into(),
        secondary: None,
    };
    let regarding = kube::Resource::object_ref(&cc, &());
    for note in
        ["the 5 voters are now a, b, c, d, e", "the 3 voters are now a, b, c", "the 3 voters are now a, b, c"]
    {
        ctx.recorder.publish(&voters(note), &regarding).await.expect("published");
    }

    let requests = api.requests();
    let notes: Vec<String> = events(&requests).into_iter().map(|(_, _, note)| note).collect();
    assert_eq!(notes, ["the 5 voters are now a, b, c, d, e", "the 3 voters are now a, b, c"]);
    let repeat =
        requests.iter().find(|r| r.method == "PATCH" && r.path.starts_with(EVENTS)).expect("a repeat");
    assert_eq!(repeat.body["series"]["count"], 2, "{}", repeat.body);
    assert_eq!(api.story().len(), 3);
}

#[tokio::test]
async fn a_backup_is_started_as_a_job_and_the_ended_runs_go_after_it() {
    let cc = cluster(
        json!({"replicas": 3, "backup": {"schedule": "@hourly", "destination": {"s3": {
            "bucket": "backups", "endpoint": "http://s3.local:9000", "forcePathStyle": true,
            "credentialsSecret": {"name": "s3"}}}}}),
        true,
    );
    let mut objects = running_cluster_objects(&cc, InitialClusterState::Existing);
    // An earlier slot's run that ended.
    let ended = "demo-backup-20261201090000-1";
    objects.push(json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": ended, "namespace": NS, "creationTimestamp": "2026-12-01T09:00:01Z",
            "annotations": {"consensus.dev/backup": "demo-20261201T090000Z",
                "consensus.dev/backup-slot": "2026-12-01T09:00:00Z", "consensus.dev/backup-attempt": "1",
                "consensus.dev/backup-member": "demo-1"}},
        "status": {"conditions": [{"type": "Complete", "status": "True",
            "lastTransitionTime": "2026-12-01T09:00:09Z"}]},
    }));
    let (client, api) = FakeApi::start(with_cluster(&cc, objects));
    let ctx = context(client, healthy(3));
    let slot = "2026-12-01T10:00:00Z".parse().expect("a time");

    converge_with(&cc, &ctx, |_| Step::TakeBackup { slot, attempt: 1, from: "demo-1".into(), request: None })
        .await
        .expect("reconciles");

    let requests = api.requests();
    let created = only(&requests, "POST", JOBS);
    let job = &created.body;
    assert_eq!(job["metadata"]["name"], "demo-backup-20261201100000-1");
    assert_eq!(job["metadata"]["labels"]["app.kubernetes.io/name"], "consensus-backup");
    let args: Vec<&str> = job["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let line = args.join(" ");
    assert!(line.starts_with("backup --endpoint http://demo-1.demo-peer.default.svc:2379"), "{line}");
    assert!(line.contains("--to s3://backups/default/demo --name demo-20261201T100000Z"), "{line}");
    assert!(line.contains("--verify"), "{line}");
    // Created first, then the ended run deleted, with its pods.
    let position =
        |method: &str, path: &str| requests.iter().position(|r| r.method == method && r.path == path);
    let delete = only(&requests, "DELETE", &format!("{JOBS}/{ended}"));
    assert_eq!(delete.body["propagationPolicy"], "Background");
    assert!(position("POST", JOBS) < position("DELETE", &format!("{JOBS}/{ended}")));
    let started = events(&requests).into_iter().find(|(_, reason, _)| reason == "BackupStarted");
    assert!(started.is_some_and(|(_, _, note)| note.contains("demo-20261201T100000Z")));
    let status = &only(&requests, "PATCH", &format!("{CC}/status")).body["status"];
    assert_eq!(status["lastScheduledBackup"], "2026-12-01T10:00:00Z");
    assert_allowed_by_cluster_role(&requests);
}

#[tokio::test]
async fn a_consensus_backup_is_taken_by_a_job_it_owns_and_its_status_says_so() {
    // No schedule: the request names its own destination.
    let cc = cluster(json!({"replicas": 3}), true);
    let mut objects = running_cluster_objects(&cc, InitialClusterState::Existing);
    objects.push(json!({
        "apiVersion": "consensus.dev/v1alpha1", "kind": "ConsensusBackup",
        "metadata": {"name": "before-upgrade", "namespace": NS, "uid": "99999999-2222-4333-8444-555555555555",
            "creationTimestamp": "2026-12-01T10:04:00Z", "generation": 1},
        "spec": {"clusterName": "demo", "destination": {"s3": {"bucket": "backups",
            "endpoint": "http://s3.local:9000", "forcePathStyle": true, "credentialsSecret": {"name": "s3"}}}},
    }));
    let (client, api) = FakeApi::start(with_cluster(&cc, objects));
    let ctx = context(client, healthy(3));

    reconcile(Arc::new(cc), ctx.clone()).await.expect("reconciles");

    let requests = api.requests();
    let job = &only(&requests, "POST", JOBS).body;
    assert_eq!(job["metadata"]["name"], "before-upgrade-backup-1");
    assert_eq!(job["metadata"]["annotations"]["consensus.dev/backup-request"], "before-upgrade");
    let owner = &job["metadata"]["ownerReferences"][0];
    assert_eq!(
        (owner["kind"].as_str(), owner["name"].as_str()),
        (Some("ConsensusBackup"), Some("before-upgrade"))
    );
    assert_eq!(owner["controller"], true);
    // Still labelled as the cluster's run, which is how its progress wakes the cluster.
    assert_eq!(job["metadata"]["labels"]["app.kubernetes.io/instance"], "demo");
    let args = job["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains("\"--name\",\"demo-20261201T100400Z-before-upgrade\""), "{args}");
    assert!(!args.contains("--retain-count"), "a request deletes no backup: {args}");
    // Its own status, applied by the status field manager; the cluster's schedule untouched.
    let written = only(&requests, "PATCH", &format!("{BACKUPS}/before-upgrade/status"));
    assert_eq!(written.query.get("fieldManager").map(String::as_str), Some(STATUS_FIELD_MANAGER));
    assert_eq!(written.body["status"]["phase"], "Running");
    assert_eq!(written.body["status"]["attempts"], 1);
    let cluster_status = &only(&requests, "PATCH", &format!("{CC}/status")).body["status"];
    assert_eq!(cluster_status.get("lastScheduledBackup"), None);
    let started: Vec<_> =
        events(&requests).into_iter().filter(|(_, reason, _)| reason == "BackupStarted").collect();
    assert_eq!(started.len(), 2, "one on the cluster, one on the request: {started:?}");
    assert_allowed_by_cluster_role(&requests);
}

/// A cluster whose quorum was lost at 10:00 with two of three members gone: demo-0 answers
/// alone with what it applied; status still has the old cluster's id.
fn lost_quorum(annotation: Option<&str>) -> (ConsensusCluster, Vec<Value>, FakeMembers) {
    let mut cc = cluster(json!({"replicas": 3}), true);
    if let Some(at) = annotation {
        cc.metadata.annotations = Some([("consensus.dev/recover".to_owned(), at.to_owned())].into());
    }
    cc.status = Some(
        serde_json::from_value(json!({
            "phase": "QuorumLost", "clusterId": format!("{CLUSTER_ID:x}"),
            "conditions": [{
                "type": "QuorumLost", "status": "True", "reason": "NotEnoughHealthyVoters",
                "message": "1 of 3 voters are healthy", "lastTransitionTime": "2026-12-01T10:00:00Z",
            }],
        }))
        .expect("status"),
    );
    let objects = not_ready(running_cluster_objects(&cc, InitialClusterState::Existing));
    let mut left = members(3);
    for member in &mut left[1..] {
        member.answers = false;
    }
    (cc, objects, FakeMembers::answering(Cluster { members: left, leader: None }))
}

#[tokio::test]
async fn a_recovery_asked_for_by_annotation_is_recorded_first_and_then_takes_the_survivors_snapshot() {
    let (cc, objects, members) = lost_quorum(Some("2026-12-01T10:05:00Z"));
    let (client, api) = FakeApi::start(with_cluster(&cc, objects.clone()));
    reconcile(Arc::new(cc.clone()), context(client, members)).await.expect("reconciles");

    // Recorded before anything is changed: nothing applied, nothing created.
    let requests = api.requests();
    let written = &only(&requests, "PATCH", &format!("{CC}/status")).body;
    // Only onto the version it was decided from: a stale copy never starts a second one.
    assert_eq!(written["metadata"]["resourceVersion"], "7");
    let status = &written["status"];
    let record = &status["recovery"];
    assert_eq!(record["source"], "Survivor", "{record}");
    assert_eq!(record["from"], "demo-0");
    assert_eq!(record["requested"], "2026-12-01T10:05:00Z");
    assert_eq!(record["previousClusterId"], format!("{CLUSTER_ID:x}"));
    assert_eq!(status["phase"], "Restoring");
    let started = events(&requests).into_iter().find(|(_, reason, _)| reason == "RecoveryStarted");
    assert_eq!(started.map(|(type_, _, _)| type_).as_deref(), Some("Warning"));
    assert!(
        api.writes().iter().all(|w| w.path == format!("{CC}/status") || w.path == EVENTS),
        "{:#?}",
        api.story()
    );

    // The next reconcile carries it on: the survivor's snapshot Job, on its own volume.
    let (cc, _, members) = lost_quorum(Some("2026-12-01T10:05:00Z"));
    let cc = ConsensusCluster { status: serde_json::from_value(status.clone()).ok(), ..cc };
    let (client, api) = FakeApi::start(with_cluster(&cc, objects));
    reconcile(Arc::new(cc), context(client, members)).await.expect("reconciles");
    let requests = api.requests();
    let job = &only(&requests, "POST", JOBS).body;
    assert_eq!(job["metadata"]["name"], "demo-recovery-snapshot");
    let token = record["clusterToken"].as_str().expect("a token");
    assert_eq!(job["metadata"]["annotations"]["consensus.dev/recovery-token"], token);
    assert_eq!(job["metadata"]["labels"]["app.kubernetes.io/name"], "consensus-recovery");
    let pod = &job["spec"]["template"]["spec"];
    let claim = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find_map(|v| v["persistentVolumeClaim"]["claimName"].as_str());
    assert_eq!(claim, Some("data-demo-0"));
    let args: Vec<&str> =
        pod["containers"][0]["args"].as_array().expect("args").iter().filter_map(Value::as_str).collect();
    let to = format!("file:///var/lib/consensus/replaced/{token}");
    assert_eq!(
        args,
        ["backup", "--endpoint", "http://demo-0.demo-peer.default.svc:2379", "--to", &to, "--name", "source"]
    );
    assert!(events(&requests).iter().any(|(_, reason, _)| reason == "RecoverySnapshot"));
    assert_allowed_by_cluster_role(&requests);
}

#[tokio::test]
async fn a_request_made_before_the_loss_recovers_nothing_and_says_so() {
    let (cc, objects, members) = lost_quorum(Some("2026-12-01T09:00:00Z"));
    let (client, api) = FakeApi::start(with_cluster(&cc, objects));
    reconcile(Arc::new(cc), context(client, members)).await.expect("reconciles");
    let requests = api.requests();
    let status = &only(&requests, "PATCH", &format!("{CC}/status")).body["status"];
    assert_eq!(status["recovery"], Value::Null);
    let message = condition(status, "QuorumLost")["message"].as_str().unwrap_or_default();
    assert!(message.contains("was made before the quorum was lost"), "{message}");
}
