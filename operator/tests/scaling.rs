//! Scaling scenarios against a fake API server and fake members: what each planner step
//! does to the StatefulSet, the ConfigMap, the volumes and the membership, and what it
//! reports. The step is passed in (`converge_with`), so these pin the Kubernetes side of
//! each step whatever the planner decides; the planner's order is its own tests' business.
//! The disruption budget's walk is the exception: the budget must hold along the order the
//! planner actually takes, so there the planner takes every step.

mod support;

use std::ops::Range;
use std::sync::{Arc, Mutex};

use consensus_crds::{ConsensusCluster, FIELD_MANAGER};
use consensus_operator::k8s::events::Events;
use consensus_operator::k8s::metrics::Metrics;
use consensus_operator::k8s::reconcile::{Context, FINALIZER, converge_with, reconcile};
use consensus_operator::plan::{Observed, Step, ordinal, plan, quorum};
use consensus_operator::resources::{Guarded, InitialClusterState, Members, desired};
use kube::Client;
use kube::runtime::events::Reporter;
use serde_json::{Value, json};
use support::members::{Asked, Cluster, FakeMembers, Member};
use support::{
    CC, CONFIG, EVENTS, FakeApi, NS, PDB, PODS, PVCS, Recorded, STS, applied_objects,
    assert_allowed_by_cluster_role, only,
};

const LEADER_RAFT_INDEX: u64 = 100;

/// `demo-i` has id `0x10 + i`.
fn id(i: u64) -> u64 {
    0x10 + i
}

/// `demo-i`'s own client URL, under the headless peer Service: where leader-only changes
/// must go when it leads, never the client Service (`demo-client`), which picks any ready
/// member.
fn url(i: u64) -> String {
    format!("http://demo-{i}.demo-peer.default.svc:2379")
}

fn member(i: u64, is_learner: bool, started: bool) -> Member {
    Member {
        id: id(i),
        name: format!("demo-{i}"),
        is_learner,
        started,
        answers: started,
        applied_index: LEADER_RAFT_INDEX,
        raft_index: LEADER_RAFT_INDEX,
    }
}

/// `voters` and `learners` by ordinal, every one of them running, `leader` leading.
fn membership(voters: Range<u64>, learners: Range<u64>, leader: u64) -> Cluster {
    let members =
        voters.map(|i| member(i, false, true)).chain(learners.map(|i| member(i, true, true))).collect();
    Cluster { members, leader: Some(id(leader)) }
}

fn cluster(replicas: i32) -> ConsensusCluster {
    serde_json::from_value(json!({
        "apiVersion": "consensus.dev/v1alpha1",
        "kind": "ConsensusCluster",
        "metadata": {
            "name": "demo", "namespace": NS, "uid": "11111111-2222-4333-8444-555555555555",
            "generation": 3, "resourceVersion": "7", "finalizers": [FINALIZER],
        },
        "spec": {"replicas": replicas},
    }))
    .expect("a ConsensusCluster")
}

fn context(client: Client, members: FakeMembers) -> Context<FakeMembers> {
    let reporter =
        Reporter { controller: "consensus-operator".into(), instance: Some("consensus-operator-0".into()) };
    Context { recorder: Events::new(client.clone(), reporter), client, members, metrics: Metrics::shared() }
}

fn selector_labels() -> Value {
    json!({"app.kubernetes.io/name": "consensus-node", "app.kubernetes.io/instance": "demo"})
}

fn pod(i: u64) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("demo-{i}"), "namespace": NS, "labels": selector_labels()},
        "spec": {"containers": []},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    })
}

fn claim(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": NS, "labels": selector_labels()},
    })
}

/// The cluster resource, its objects as applied for `replicas` members that have formed
/// the cluster, `voters` of them voting, the pods `pods` and the volumes `volumes`.
fn objects(
    cc: &ConsensusCluster,
    replicas: i32,
    voters: usize,
    pods: Range<u64>,
    volumes: Range<u64>,
) -> Vec<Value> {
    let guarded = Guarded { pods: replicas, voters: Some(voters) };
    let mut objects =
        applied_objects(cc, Members { replicas, state: InitialClusterState::Existing, guarded });
    objects.push(serde_json::to_value(cc).expect("serializes"));
    objects.extend(pods.map(pod));
    objects.extend(volumes.map(|i| claim(&format!("data-demo-{i}"))));
    objects
}

/// One reconcile acting on `step`; the requests it made.
async fn act(cc: &ConsensusCluster, ctx: &Context<FakeMembers>, api: &FakeApi, step: Step) -> Vec<Recorded> {
    let before = api.requests().len();
    converge_with(cc, ctx, |_| step).await.expect("reconciles");
    api.requests().split_off(before)
}

fn patches<'a>(requests: &'a [Recorded], path: &str) -> Vec<&'a Recorded> {
    requests.iter().filter(|r| r.method == "PATCH" && r.path == path).collect()
}

/// `Type Reason: note` of each Event written.
fn events(requests: &[Recorded]) -> Vec<String> {
    requests
        .iter()
        .filter(|r| r.method == "POST" && r.path == EVENTS)
        .map(|r| {
            let text = |field: &str| r.body[field].as_str().unwrap_or_default().to_owned();
            format!("{} {}: {}", text("type"), text("reason"), text("note"))
        })
        .collect()
}

fn deletes(requests: &[Recorded]) -> Vec<String> {
    requests.iter().filter(|r| r.method == "DELETE").map(Recorded::line).collect()
}

fn replicas_applied(requests: &[Recorded]) -> Vec<i64> {
    patches(requests, STS).iter().filter_map(|r| r.body["spec"]["replicas"].as_i64()).collect()
}

fn initial_cluster(n: u64) -> String {
    (0..n)
        .map(|i| format!("demo-{i}=http://demo-{i}.demo-peer.default.svc:2380"))
        .collect::<Vec<_>>()
        .join(",")
}

#[tokio::test]
async fn scaling_up_adds_each_new_member_as_a_learner_then_grows_the_statefulset() {
    // kubectl scale cc/demo --replicas=5 on a running 3-member cluster.
    let cc = cluster(5);
    let (client, api) = FakeApi::start(objects(&cc, 3, 3, 0..3, 0..3));
    let ctx = context(client, FakeMembers::answering(membership(0..3, 0..0, 0)));

    // 1. demo-3 is added as a learner, at the peer URL its pod will advertise, before
    //    its pod exists: the StatefulSet stays at 3.
    let first = act(&cc, &ctx, &api, Step::AddLearner { name: "demo-3".into() }).await;
    assert_eq!(
        ctx.members.changes(),
        [Asked::AddLearner { endpoint: url(0), peer_url: "http://demo-3.demo-peer.default.svc:2380".into() }]
    );
    assert_eq!(replicas_applied(&first), [3], "the StatefulSet is kept at 3 while learners are added");
    assert_eq!(
        events(&first),
        [
            "Normal MemberAdded: added demo-3 (id 13) as a learner at http://demo-3.demo-peer.default.svc:2380; \
          it catches up before it votes"
        ]
    );

    // 2. The members now list demo-3, unstarted; demo-4 is added the same way.
    let mut members = membership(0..3, 0..0, 0);
    members.members.push(member(3, true, false));
    ctx.members.now(members.clone());
    let second = act(&cc, &ctx, &api, Step::AddLearner { name: "demo-4".into() }).await;
    assert_eq!(
        ctx.members.changes()[1],
        Asked::AddLearner { endpoint: url(0), peer_url: "http://demo-4.demo-peer.default.svc:2380".into() }
    );
    assert_eq!(replicas_applied(&second), [3]);

    // 3. The next reconcile grows the StatefulSet to 5: the ConfigMap first, listing all
    //    five members and telling the new ones to join, then the StatefulSet, by
    //    server-side apply under the operator's field manager.
    members.members.push(member(4, true, false));
    ctx.members.now(members);
    let third = act(&cc, &ctx, &api, Step::ResizeWorkload { replicas: 5 }).await;
    let config = only(&third, "PATCH", CONFIG);
    assert_eq!(config.body["data"]["initial-cluster"], initial_cluster(5));
    assert_eq!(config.body["data"]["initial-cluster-state"], "existing");
    let sts = only(&third, "PATCH", STS);
    assert_eq!(sts.method, "PATCH");
    assert_eq!(sts.path, "/apis/apps/v1/namespaces/default/statefulsets/demo");
    assert!(sts.is_apply(), "server-side apply");
    assert_eq!(sts.field_manager(), Some(FIELD_MANAGER));
    assert_eq!(sts.query.get("fieldManager").map(String::as_str), Some("consensus-operator"));
    assert!(sts.forced());
    assert_eq!(sts.body["spec"]["replicas"], 5);
    // Only the replicas change: the rest is what was applied at 3, so the operator keeps
    // owning every field it owned and no pod template changes (no rolling restart).
    let guarded = Guarded { pods: 3, voters: Some(3) };
    let mut at_three = serde_json::to_value(
        desired(&cc, Members { replicas: 3, state: InitialClusterState::Existing, guarded })
            .expect("builds")
            .stateful_set,
    )
    .expect("serializes");
    at_three["spec"]["replicas"] = json!(5);
    assert_eq!(sts.body, at_three);
    let position = |path: &str| third.iter().position(|r| r.method == "PATCH" && r.path == path);
    assert!(position(CONFIG) < position(STS), "the configuration is in place before new pods start");
    assert_eq!(api.object(STS).expect("exists")["spec"]["replicas"], 5);
    assert_eq!(
        events(&third),
        [
            "Normal Updated: updated ConfigMap demo-config",
            "Normal Updated: updated PodDisruptionBudget demo",
            "Normal Updated: updated StatefulSet demo",
            "Normal Resized: StatefulSet demo: 3 -> 5 replicas",
        ]
    );

    // No volume was touched, and every request is allowed.
    assert!(deletes(&api.requests()).is_empty());
    assert_allowed_by_cluster_role(&api.requests());
}

#[tokio::test]
async fn a_voter_change_promotes_the_caught_up_learners_in_one_step_and_says_so() {
    let cc = cluster(5);
    let (client, api) = FakeApi::start(objects(&cc, 5, 3, 0..5, 0..5));
    let ctx = context(client, FakeMembers::answering(membership(0..3, 3..5, 0)));

    let voters: Vec<u64> = (0..5).map(id).collect();
    let requests = act(&cc, &ctx, &api, Step::ChangeVoters { voters: voters.clone() }).await;

    assert_eq!(ctx.members.changes(), [Asked::ChangeVoters { endpoint: url(0), voters }]);
    assert_eq!(
        events(&requests),
        [
            "Normal LearnerCaughtUp: learner demo-3 caught up (applied index 100, leader at 100) and now votes",
            "Normal LearnerCaughtUp: learner demo-4 caught up (applied index 100, leader at 100) and now votes",
            "Normal VotersChanged: the 5 voters are now demo-0, demo-1, demo-2, demo-3, demo-4, changed in one \
             joint-consensus step",
        ]
    );
    assert_eq!(replicas_applied(&requests), [5]);
    assert_allowed_by_cluster_role(&requests);
}

#[tokio::test]
async fn a_refused_voter_change_is_a_warning_and_claims_nothing() {
    let cc = cluster(5);
    let (client, api) = FakeApi::start(objects(&cc, 5, 3, 0..5, 0..5));
    let members = FakeMembers::answering(membership(0..3, 3..5, 0)).refusing();
    let ctx = context(client, members);

    let voters: Vec<u64> = (0..5).map(id).collect();
    let outcome = converge_with(&cc, &ctx, |_| Step::ChangeVoters { voters }).await;

    assert!(outcome.is_err(), "the reconcile fails and is retried");
    let reported = events(&api.requests());
    assert_eq!(reported.len(), 1, "{reported:?}");
    assert!(reported[0].starts_with("Warning MembershipChangeFailed: "), "{reported:?}");
    assert!(reported[0].contains("a learner is not caught up"), "{reported:?}");
}

#[tokio::test]
async fn scaling_down_moves_leadership_off_removes_members_shrinks_and_only_then_deletes_volumes() {
    // kubectl scale cc/demo --replicas=3 on a running 5-member cluster led by demo-4,
    // one of the two members that leave.
    let cc = cluster(3);
    let (client, api) = FakeApi::start(objects(&cc, 5, 5, 0..5, 0..5));
    let ctx = context(client, FakeMembers::answering(membership(0..5, 0..0, 4)));

    // 1. Leadership moves to a member that stays.
    let moved = act(&cc, &ctx, &api, Step::TransferLeadership { to: id(0) }).await;
    // MoveLeader is accepted only on the leader: it goes to demo-4's own address.
    assert_eq!(ctx.members.changes(), [Asked::MoveLeader { endpoint: url(4), to: id(0) }]);
    assert_eq!(events(&moved), ["Normal LeadershipTransferred: moved leadership from demo-4 to demo-0"]);

    // 2. The voters go from 5 to 3 in one step; demo-3 and demo-4 are left as learners.
    ctx.members.now(membership(0..5, 0..0, 0));
    let voters: Vec<u64> = (0..3).map(id).collect();
    let changed = act(&cc, &ctx, &api, Step::ChangeVoters { voters: voters.clone() }).await;
    // The disruption budget is lowered to what three voters spare before the change is made.
    assert_eq!(only(&changed, "PATCH", PDB).body["spec"]["minAvailable"], 5 - 1);
    assert_eq!(
        events(&changed),
        [
            "Normal Updated: updated PodDisruptionBudget demo",
            "Normal VotersChanged: the 3 voters are now demo-0, demo-1, demo-2, changed in one joint-consensus step"
        ]
    );

    // 3. Both leave the membership.
    ctx.members.now(membership(0..3, 3..5, 0));
    let removed_4 = act(&cc, &ctx, &api, Step::RemoveMember { id: id(4), name: "demo-4".into() }).await;
    ctx.members.now(membership(0..3, 3..4, 0));
    let removed_3 = act(&cc, &ctx, &api, Step::RemoveMember { id: id(3), name: "demo-3".into() }).await;
    assert_eq!(
        ctx.members.changes()[2..],
        [Asked::Remove { endpoint: url(0), id: id(4) }, Asked::Remove { endpoint: url(0), id: id(3) },]
    );
    assert_eq!(events(&removed_4), ["Normal MemberRemoved: removed demo-4 (id 14) from the membership"]);
    assert_eq!(events(&removed_3), ["Normal MemberRemoved: removed demo-3 (id 13) from the membership"]);
    ctx.members.now(membership(0..3, 0..0, 0));

    // 4. A volume deletion asked for while the StatefulSet still runs the pod is not done.
    let too_early = act(&cc, &ctx, &api, Step::DeleteVolume { name: "demo-4".into() }).await;
    assert!(deletes(&too_early).is_empty(), "{:?}", deletes(&too_early));
    assert!(events(&too_early).is_empty());

    // 5. The StatefulSet shrinks to 3 under the operator's field manager, with a
    //    configuration of the three members that stay.
    let shrunk = act(&cc, &ctx, &api, Step::ResizeWorkload { replicas: 3 }).await;
    let sts = only(&shrunk, "PATCH", STS);
    assert!(sts.is_apply());
    assert_eq!(sts.field_manager(), Some(FIELD_MANAGER));
    assert_eq!(sts.body["spec"]["replicas"], 3);
    assert_eq!(only(&shrunk, "PATCH", CONFIG).body["data"]["initial-cluster"], initial_cluster(3));
    assert!(events(&shrunk).contains(&"Normal Resized: StatefulSet demo: 5 -> 3 replicas".to_owned()));
    assert!(deletes(&shrunk).is_empty(), "no volume goes in the same step");

    // 6. The StatefulSet controller deletes demo-3's and demo-4's pods; their volumes go.
    api.vanish(&format!("{PODS}/demo-3"));
    api.vanish(&format!("{PODS}/demo-4"));
    let deleted_3 = act(&cc, &ctx, &api, Step::DeleteVolume { name: "demo-3".into() }).await;
    let deleted_4 = act(&cc, &ctx, &api, Step::DeleteVolume { name: "demo-4".into() }).await;
    assert_eq!(deletes(&deleted_3), [format!("DELETE {PVCS}/data-demo-3")]);
    assert_eq!(deletes(&deleted_4), [format!("DELETE {PVCS}/data-demo-4")]);
    // The budget stops counting the two pods once they are gone (its Event is a repeat of
    // the one above, counted in that Event's series).
    assert_eq!(only(&deleted_3, "PATCH", PDB).body["spec"]["minAvailable"], 3 - 1);
    assert_eq!(
        events(&deleted_3),
        ["Normal VolumeDeleted: deleted data-demo-3, the volume of removed member demo-3"]
    );
    assert_eq!(
        events(&deleted_4),
        ["Normal VolumeDeleted: deleted data-demo-4, the volume of removed member demo-4"]
    );
    for i in 0..3 {
        assert!(api.object(&format!("{PVCS}/data-demo-{i}")).is_some(), "data-demo-{i} stays");
    }

    // The whole story: the only deletions are these two volumes, after the shrink.
    let story = api.story();
    let deleted: Vec<&String> = story.iter().filter(|line| line.starts_with("DELETE")).collect();
    assert_eq!(deleted, [&format!("DELETE {PVCS}/data-demo-3"), &format!("DELETE {PVCS}/data-demo-4")]);
    let all = api.requests();
    let shrink_at =
        all.iter().position(|r| r.method == "PATCH" && r.path == STS && r.body["spec"]["replicas"] == 3);
    let first_delete = all.iter().position(|r| r.method == "DELETE");
    assert!(shrink_at < first_delete, "volumes are deleted only after the StatefulSet shrank");
    assert_allowed_by_cluster_role(&all);
}

#[tokio::test]
async fn a_volume_is_never_deleted_while_its_member_could_still_need_it() {
    // Each case: the StatefulSet's replicas, the pods that exist, what the members answer.
    let cases: [(&str, i32, Range<u64>, Option<Cluster>); 4] = [
        ("demo-3 is still in the membership", 3, 0..3, Some(membership(0..3, 3..4, 0))),
        ("demo-3's pod still exists (terminating)", 3, 0..4, Some(membership(0..3, 0..0, 0))),
        ("the StatefulSet still runs demo-3", 4, 0..3, Some(membership(0..3, 0..0, 0))),
        ("no member answers, so the removal is not confirmed", 3, 0..3, None),
    ];
    for (case, replicas, pods, answer) in cases {
        let cc = cluster(3);
        let (client, api) = FakeApi::start(objects(&cc, replicas, 3, pods, 0..4));
        let ctx = context(client, answer.map_or_else(FakeMembers::unreachable, FakeMembers::answering));

        let requests = act(&cc, &ctx, &api, Step::DeleteVolume { name: "demo-3".into() }).await;

        assert!(deletes(&requests).is_empty(), "{case}: {:?}", deletes(&requests));
        assert!(api.object(&format!("{PVCS}/data-demo-3")).is_some(), "{case}");
        assert!(!events(&requests).iter().any(|e| e.contains("VolumeDeleted")), "{case}");
    }
}

#[tokio::test]
async fn a_volume_already_deleted_is_done_not_an_error() {
    // The operator died after the DELETE and before its Event: the next reconcile finishes.
    let cc = cluster(3);
    let (client, api) = FakeApi::start(objects(&cc, 3, 3, 0..3, 0..3));
    let ctx = context(client, FakeMembers::answering(membership(0..3, 0..0, 0)));

    let requests = act(&cc, &ctx, &api, Step::DeleteVolume { name: "demo-4".into() }).await;

    assert_eq!(deletes(&requests), [format!("DELETE {PVCS}/data-demo-4")]);
    assert!(events(&requests).is_empty());
}

#[tokio::test]
async fn an_even_replica_count_never_writes_the_statefulset() {
    // kubectl scale cc/demo --replicas=4 on a 5-member cluster, past admission.
    let running = cluster(5);
    let cc = cluster(4);
    let mut objects = objects(&running, 5, 5, 0..5, 0..5);
    objects.retain(|o| o["kind"] != "ConsensusCluster");
    objects.push(serde_json::to_value(&cc).expect("serializes"));
    let (client, api) = FakeApi::start(objects);
    let ctx = context(client, FakeMembers::answering(membership(0..5, 0..0, 0)));

    reconcile(Arc::new(cc), Arc::new(ctx)).await.expect("reconciles");

    // Writes: the Warning and the status, nothing else.
    let writes: Vec<String> = api.writes().iter().map(Recorded::line).collect();
    assert_eq!(writes, [format!("POST {EVENTS}"), format!("PATCH {CC}/status")]);
    let requests = api.requests();
    assert!(patches(&requests, STS).is_empty(), "the StatefulSet is not written");
    assert!(patches(&requests, CONFIG).is_empty(), "nor its configuration");
    assert!(deletes(&requests).is_empty());
    assert_eq!(api.object(STS).expect("still there")["spec"]["replicas"], 5);
    let reported = events(&requests);
    assert_eq!(reported.len(), 1);
    assert!(reported[0].starts_with("Warning InvalidSpec: "), "{reported:?}");
}

#[tokio::test]
async fn observation_reports_volumes_the_leaders_raft_index_and_members_that_lost_their_data() {
    let cc = cluster(5);
    let mut objects = objects(&cc, 5, 5, 0..1, 0..5);
    // A claim of something else in the namespace, with the same labels.
    objects.push(claim("scratch"));
    // demo-1 crashed with the node's lost-data exit code; demo-2 said so in its
    // termination message; demo-3 just crashed.
    let terminated = |i: u64, exit_code: i32, message: &str| {
        let mut pod = pod(i);
        pod["status"]["containerStatuses"] = json!([{
            "name": "consensus-node", "image": "node", "imageID": "", "ready": false, "restartCount": 3,
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": exit_code, "message": message}},
        }]);
        pod
    };
    objects.push(terminated(1, 78, ""));
    objects.push(terminated(2, 1, "member demo-2 lost its data: members.yaml names it, the WAL is empty"));
    objects.push(terminated(3, 1, "panic"));
    let (client, _api) = FakeApi::start(objects);
    let mut members = membership(0..5, 0..0, 0);
    members.members[0].raft_index = LEADER_RAFT_INDEX + 7;
    let ctx = context(client, FakeMembers::answering(members));

    let seen: Mutex<Option<Observed>> = Mutex::default();
    converge_with(&cc, &ctx, |observed| {
        *seen.lock().expect("lock") = Some(observed.clone());
        Step::Wait { reason: "looking".into() }
    })
    .await
    .expect("reconciles");

    let observed = seen.into_inner().expect("lock").expect("decided");
    assert_eq!(ctx.members.asked(), (0..5).map(url).collect::<Vec<_>>(), "every member the StatefulSet runs");
    assert_eq!(observed.volumes, ["demo-0", "demo-1", "demo-2", "demo-3", "demo-4"]);
    assert_eq!(observed.leader_raft_index, Some(LEADER_RAFT_INDEX + 7));
    assert_eq!(observed.lost_data, ["demo-1", "demo-2"]);
}

/// The cluster the planner drives in the walk below: what the members answer, and the pods
/// and volume claims the StatefulSet controller keeps, each changed the way the step the
/// operator just took changes them.
struct World {
    members: Cluster,
    /// The StatefulSet runs `demo-0 .. demo-{pods - 1}`.
    pods: u64,
}

impl World {
    fn voters(&self) -> usize {
        self.members.members.iter().filter(|m| !m.is_learner).count()
    }

    fn take(&mut self, step: &Step, api: &FakeApi) {
        match step {
            Step::AddLearner { name } => {
                let (_, i) = ordinal(name).expect("a member name");
                self.members.members.push(member(u64::from(i), true, false));
            }
            Step::ResizeWorkload { replicas } => {
                let replicas = u64::try_from(*replicas).expect("not negative");
                for i in self.pods..replicas {
                    api.put(pod(i));
                    api.put(claim(&format!("data-demo-{i}")));
                    // Started on its pod, the learner is caught up by the next reconcile.
                    for started in self.members.members.iter_mut().filter(|m| m.id == id(i)) {
                        (started.started, started.answers) = (true, true);
                    }
                }
                for i in replicas..self.pods {
                    api.vanish(&format!("{PODS}/demo-{i}"));
                }
                self.pods = replicas;
            }
            Step::ChangeVoters { voters } => {
                for m in &mut self.members.members {
                    m.is_learner = !voters.contains(&m.id);
                }
            }
            Step::TransferLeadership { to } => self.members.leader = Some(*to),
            Step::RemoveMember { id, .. } => self.members.members.retain(|m| m.id != *id),
            // Volumes are deleted, and pods restarted, by the operator itself on the fake API
            // server; the pods in this world never fall behind their template, and its
            // clusters declare no backups and no recovery.
            Step::DeleteVolume { .. }
            | Step::UpdateMember { .. }
            | Step::TakeBackup { .. }
            | Step::BeginRecovery { .. }
            | Step::Recover { .. }
            | Step::CreateWorkload { .. }
            | Step::RefuseSpec { .. }
            | Step::Wait { .. }
            | Step::Steady => {}
        }
    }
}

/// `status.disruptionsAllowed` as the disruption controller works it out for `budget` with
/// `ready` member pods Ready: `minAvailable` is taken as it is, `maxUnavailable` from the
/// StatefulSet's `replicas` (the expected count its scale gives).
fn disruptions_allowed(budget: &Value, ready: u64, replicas: u64) -> i64 {
    let spec = &budget["spec"];
    let desired_healthy = match (spec["minAvailable"].as_i64(), spec["maxUnavailable"].as_i64()) {
        (Some(min), None) => min,
        (None, Some(max)) => i64::try_from(replicas).expect("small") - max,
        other => panic!("a budget sets one of minAvailable and maxUnavailable, as a number: {other:?}"),
    };
    (i64::try_from(ready).expect("small") - desired_healthy).max(0)
}

#[tokio::test]
async fn the_disruption_budget_never_spares_more_than_the_voters_through_3_5_3() {
    // kubectl scale cc/demo --replicas=5, then back to 3, the planner taking every step.
    let (client, api) = FakeApi::start(objects(&cluster(3), 3, 3, 0..3, 0..3));
    let mut world = World { members: membership(0..3, 0..0, 0), pods: 3 };
    let ctx = context(client, FakeMembers::answering(world.members.clone()));

    let mut walked = Vec::new();
    for replicas in [5, 3] {
        let cc = cluster(replicas);
        loop {
            let (voters_before, pods_before) = (world.voters(), world.pods);
            let planned = Mutex::new(None);
            let before = api.requests().len();
            converge_with(&cc, &ctx, |observed| {
                let step = plan(&cc.spec, observed);
                *planned.lock().expect("lock") = Some(step.clone());
                step
            })
            .await
            .expect("reconciles");
            let step = planned.into_inner().expect("lock").expect("planned");
            let requests = api.requests().split_off(before);
            only(&requests, "PATCH", PDB);
            world.take(&step, &api);
            ctx.members.now(world.members.clone());

            // The budget holds from its apply, before the step's change, to the next
            // reconcile's: over the voters before the change and after it, and over every
            // pod the StatefulSet ran meanwhile, all of them Ready at worst.
            let voters = voters_before.min(world.voters());
            let budget = api.object(PDB).expect("the budget exists");
            let allowed = disruptions_allowed(&budget, pods_before.max(world.pods), world.pods);
            let spare = i64::try_from(voters - quorum(voters)).expect("small");
            assert!(
                allowed <= spare,
                "after {step:?} the budget {} allows {allowed} evictions with {voters} voters",
                budget["spec"]
            );
            walked.push(format!("{} {allowed}", step.name()));
            if step == Step::Steady {
                break;
            }
            assert!(walked.len() < 20, "the walk does not converge: {walked:?}");
        }
    }
    // Every step taken, and the evictions allowed while it held: one while three vote,
    // two only once five do.
    assert_eq!(
        walked,
        [
            "AddLearner 1",
            "AddLearner 1",
            "ResizeWorkload 1",
            "ChangeVoters 1",
            "Steady 2",
            "ChangeVoters 1",
            "RemoveMember 1",
            "RemoveMember 1",
            "ResizeWorkload 1",
            "DeleteVolume 1",
            "DeleteVolume 1",
            "Steady 1",
        ]
    );
    assert_allowed_by_cluster_role(&api.requests());
}

/// `demo-i`'s pod with its one container in `state`, having last stopped with the node's
/// lost-data exit, as the kubelet reports it from then on (`lastState` outlives restarts).
fn after_lost_data_exit(i: u64, state: Value) -> Value {
    let mut pod = pod(i);
    pod["metadata"]["uid"] = json!(format!("pod-uid-{i}"));
    pod["status"]["conditions"] = json!([{"type": "Ready", "status": "False"}]);
    pod["status"]["containerStatuses"] = json!([{
        "name": "consensus-node", "image": "node", "imageID": "", "ready": false, "restartCount": 6,
        "state": state,
        "lastState": {"terminated": {"exitCode": 78, "message": "member 12 (\"demo-2\") lost its data: ..."}},
    }]);
    pod
}

/// One reconcile deciding with the planner; the step it took and the requests it made.
async fn planned(cc: &ConsensusCluster, ctx: &Context<FakeMembers>, api: &FakeApi) -> (Step, Vec<Recorded>) {
    let before = api.requests().len();
    let step: Mutex<Option<Step>> = Mutex::default();
    converge_with(cc, ctx, |observed| {
        let planned = plan(&cc.spec, observed);
        *step.lock().expect("lock") = Some(planned.clone());
        planned
    })
    .await
    .expect("reconciles");
    (step.into_inner().expect("lock").expect("decided"), api.requests().split_off(before))
}

#[tokio::test]
async fn a_member_that_lost_its_data_is_replaced_once_and_its_pod_restarted_at_once() {
    let cc = cluster(3);
    let back_off = json!({"waiting": {"reason": "CrashLoopBackOff"}});
    let running = json!({"running": {"startedAt": "2026-12-01T10:00:00Z"}});
    let new_id = 0x13;
    // The cluster with demo-2's pod in `state` after its lost-data exit, its old voter
    // (not answering) and, when `new` says so, the learner added in its place.
    let reconcile = |state: &Value, new: Option<Member>, old_is_learner: bool| {
        let mut objects = objects(&cc, 3, 3, 0..2, 0..3);
        let mut pod = after_lost_data_exit(2, state.clone());
        if new.as_ref().is_some_and(|m| m.answers) {
            pod["status"]["conditions"] = json!([{"type": "Ready", "status": "True"}]);
        }
        objects.push(pod);
        let (client, api) = FakeApi::start(objects);
        let mut members = membership(0..3, 0..0, 0);
        members.members[2].answers = false;
        members.members[2].is_learner = old_is_learner;
        members.members.extend(new);
        (context(client, FakeMembers::answering(members)), api)
    };
    let new_member = |answers: bool, is_learner: bool| Member {
        id: new_id,
        answers,
        started: answers,
        ..member(2, is_learner, true)
    };

    // 1. The same name is added as a learner while the old voter is still listed, and its
    //    pod, which the kubelet would hold in back-off for minutes, is deleted (only the
    //    one observed) so it joins now.
    let (ctx, api) = reconcile(&back_off, None, false);
    let (step, requests) = planned(&cc, &ctx, &api).await;
    assert_eq!(step, Step::AddLearner { name: "demo-2".into() });
    assert_eq!(deletes(&requests), [format!("DELETE {PODS}/demo-2")]);
    let delete = only(&requests, "DELETE", &format!("{PODS}/demo-2"));
    assert_eq!(delete.body["preconditions"]["uid"], "pod-uid-2");
    let added = events(&requests);
    assert!(added.iter().any(|e| e.starts_with("Normal MemberAdded: added demo-2 (id 13)")), "{added:?}");
    assert_allowed_by_cluster_role(&requests);

    // 2. The new member is listed under the name while its pod still shows the lost-data
    //    exit: still in back-off, or running again with the exit as its last state. Either
    //    way it is the replacement, waited for or swapped in for the old voter in one step
    //    (3 voters stay 3), never removed again.
    for (state, answers, expected) in [
        (&back_off, false, None),
        (&running, true, Some(Step::ChangeVoters { voters: vec![id(0), id(1), new_id] })),
    ] {
        let (ctx, api) = reconcile(state, Some(new_member(answers, true)), false);
        let (step, requests) = planned(&cc, &ctx, &api).await;
        match &expected {
            Some(expected) => assert_eq!(&step, expected),
            None => assert!(matches!(step, Step::Wait { .. }), "{step:?}"),
        }
        assert!(deletes(&requests).is_empty(), "{step:?}: nothing deleted: {:?}", deletes(&requests));
        assert!(
            !ctx.members
                .changes()
                .iter()
                .any(|c| matches!(c, Asked::Remove { .. } | Asked::AddLearner { .. })),
            "the replacement is neither removed nor added again: {:?}",
            ctx.members.changes()
        );
    }

    // 3. The old id, left a learner by that step, goes last.
    let (ctx, api) = reconcile(&running, Some(new_member(true, false)), true);
    let (step, _) = planned(&cc, &ctx, &api).await;
    assert_eq!(step, Step::RemoveMember { id: id(2), name: "demo-2".into() });
}
