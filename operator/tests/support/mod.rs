//! A fake Kubernetes API server behind kube's `Client` (tower-test's mock service): it
//! keeps objects by path, answers GET, LIST, PATCH (server-side apply, JSON patch,
//! status), POST and DELETE the way the API server does for what the operator uses, and
//! records every request so a test can read them back as a story.

pub mod members;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

/// Paths of the demo cluster's objects in the `default` namespace, as the scenarios use them.
pub const NS: &str = "default";
pub const CC: &str = "/apis/consensus.dev/v1alpha1/namespaces/default/consensusclusters/demo";
pub const STS: &str = "/apis/apps/v1/namespaces/default/statefulsets/demo";
pub const CONFIG: &str = "/api/v1/namespaces/default/configmaps/demo-config";
pub const PODS: &str = "/api/v1/namespaces/default/pods";
/// Backup runs; only the reconcile tests start one, and each test binary has this module.
#[allow(dead_code)]
pub const JOBS: &str = "/apis/batch/v1/namespaces/default/jobs";
/// Backups asked for now.
#[allow(dead_code)]
pub const BACKUPS: &str = "/apis/consensus.dev/v1alpha1/namespaces/default/consensusbackups";
pub const PVCS: &str = "/api/v1/namespaces/default/persistentvolumeclaims";
pub const PDB: &str = "/apis/policy/v1/namespaces/default/poddisruptionbudgets/demo";
pub const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";

/// The one request made with `method` to `path`.
pub fn only<'a>(requests: &'a [Recorded], method: &str, path: &str) -> &'a Recorded {
    let matching: Vec<&Recorded> = requests.iter().filter(|r| r.method == method && r.path == path).collect();
    assert_eq!(matching.len(), 1, "expected one {method} {path}, got {}", matching.len());
    matching[0]
}

/// Every request is one the operator's ClusterRole allows (the RBAC test of
/// tests/manifests pins the role to exactly what the code does).
pub fn assert_allowed_by_cluster_role(requests: &[Recorded]) {
    let role: Value = serde_yaml::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/rbac/cluster_role.yaml"))
            .expect("cluster role"),
    )
    .expect("YAML");
    let allows = |group: &str, resource: &str, verb: &str| {
        role["rules"].as_array().expect("rules").iter().any(|rule| {
            let has =
                |key: &str, value: &str| rule[key].as_array().is_some_and(|v| v.iter().any(|x| x == value));
            has("apiGroups", group) && has("resources", resource) && has("verbs", verb)
        })
    };
    for request in requests {
        let (group, resource, verbs) = request.authorization();
        for verb in verbs {
            assert!(allows(&group, &resource, verb), "{} needs {verb} on {group}/{resource}", request.line());
        }
    }
}

/// The objects `desired` builds for `cc` with `members`, as the API server would hold them
/// once the operator applied them.
pub fn applied_objects(
    cc: &consensus_crds::ConsensusCluster,
    members: consensus_operator::resources::Members,
) -> Vec<Value> {
    let built = consensus_operator::resources::desired(cc, members).expect("builds");
    [
        serde_json::to_value(&built.config_map),
        serde_json::to_value(&built.peer_service),
        serde_json::to_value(&built.client_service),
        serde_json::to_value(&built.pod_disruption_budget),
        serde_json::to_value(&built.stateful_set),
    ]
    .into_iter()
    .map(|o| o.expect("serializes"))
    .collect()
}

/// One request as the API server saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub content_type: String,
    pub body: Value,
}

impl Recorded {
    /// `METHOD /path`, the way the stories list requests.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }

    pub fn field_manager(&self) -> Option<&str> {
        self.query.get("fieldManager").map(String::as_str)
    }

    pub fn forced(&self) -> bool {
        self.query.get("force").is_some_and(|v| v == "true")
    }

    pub fn is_apply(&self) -> bool {
        self.method == "PATCH" && self.content_type == "application/apply-patch+yaml"
    }

    /// The RBAC verbs this request needs, and the resource (with subresource) it acts on.
    /// An apply that finds no object creates it, and is authorized as a create too.
    pub fn authorization(&self) -> (String, String, Vec<&'static str>) {
        let segments: Vec<&str> = self.path.trim_start_matches('/').split('/').collect();
        let (group, rest) = match segments.as_slice() {
            ["api", _version, rest @ ..] => (String::new(), rest),
            ["apis", group, _version, rest @ ..] => ((*group).to_owned(), rest),
            _ => panic!("unexpected path {}", self.path),
        };
        let rest = match rest {
            ["namespaces", _ns, rest @ ..] => rest,
            rest => rest,
        };
        let (resource, named) = match rest {
            [resource] => ((*resource).to_owned(), false),
            [resource, _name] => ((*resource).to_owned(), true),
            [resource, _name, sub] => (format!("{resource}/{sub}"), true),
            _ => panic!("unexpected path {}", self.path),
        };
        let verb = match (self.method.as_str(), named) {
            ("GET", true) => "get",
            ("GET", false) if self.query.get("watch").is_some_and(|w| w == "true") => "watch",
            ("GET", false) => "list",
            ("POST", _) => "create",
            ("PATCH", _) => "patch",
            ("PUT", _) => "update",
            ("DELETE", _) => "delete",
            (method, _) => panic!("unexpected method {method}"),
        };
        let verbs =
            if self.is_apply() && !resource.ends_with("/status") { vec![verb, "create"] } else { vec![verb] };
        (group, resource, verbs)
    }
}

#[derive(Default)]
struct State {
    /// Objects by their path, as the API server would return them.
    objects: BTreeMap<String, Value>,
    /// The last applied configuration by path, to answer an unchanged apply without a write.
    applied: BTreeMap<String, Value>,
    requests: Vec<Recorded>,
    next_version: u64,
    /// `METHOD /path` answered with this HTTP status instead, as a server that refuses it.
    refused: BTreeMap<String, u16>,
    /// Status writes of other controllers, each made once, when the request `METHOD /path`
    /// arrives: (that request, the object's path, its new status).
    meanwhile: Vec<(String, String, Value)>,
}

pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

const PLURALS: [(&str, &str); 12] = [
    ("ConsensusCluster", "consensusclusters"),
    ("ConsensusBackup", "consensusbackups"),
    ("Job", "jobs"),
    ("StorageClass", "storageclasses"),
    ("StatefulSet", "statefulsets"),
    ("Service", "services"),
    ("ConfigMap", "configmaps"),
    ("PodDisruptionBudget", "poddisruptionbudgets"),
    ("Pod", "pods"),
    ("Node", "nodes"),
    ("PersistentVolumeClaim", "persistentvolumeclaims"),
    ("Event", "events"),
];

/// Where the API server serves `object`.
pub fn path_of(object: &Value) -> String {
    let api_version = object["apiVersion"].as_str().expect("apiVersion");
    let kind = object["kind"].as_str().expect("kind");
    let plural = PLURALS.iter().find(|(k, _)| *k == kind).map(|(_, p)| *p).expect("known kind");
    let root = if api_version.contains('/') {
        format!("/apis/{api_version}")
    } else {
        format!("/api/{api_version}")
    };
    let name = object["metadata"]["name"].as_str().expect("name");
    match object["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{root}/namespaces/{ns}/{plural}/{name}"),
        None => format!("{root}/{plural}/{name}"),
    }
}

fn not_found(path: &str) -> (StatusCode, Value) {
    let status = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{path} not found"), "reason": "NotFound", "code": 404,
    });
    (StatusCode::NOT_FOUND, status)
}

impl State {
    fn version(&mut self) -> String {
        self.next_version += 1;
        self.next_version.to_string()
    }

    fn store(&mut self, path: &str, mut object: Value, uid: Option<Value>) -> Value {
        let version = self.version();
        object["metadata"]["resourceVersion"] = json!(version);
        object["metadata"]["uid"] = uid.unwrap_or_else(|| json!(format!("uid-{version}")));
        self.objects.insert(path.to_owned(), object.clone());
        object
    }

    fn answer(&mut self, request: &Recorded) -> (StatusCode, Value) {
        let line = request.line();
        if let Some(&code) = self.refused.get(&line) {
            let reason = match code {
                403 => "Forbidden",
                404 => "NotFound",
                _ => "InternalError",
            };
            let status = json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("{line} refused by the test"), "reason": reason, "code": code,
            });
            return (StatusCode::from_u16(code).expect("an HTTP status"), status);
        }
        let (now, later) =
            std::mem::take(&mut self.meanwhile).into_iter().partition(|(when, _, _)| *when == line);
        self.meanwhile = later;
        for (_, path, status) in now {
            let mut object = self.objects.get(&path).cloned().expect("the object another controller writes");
            object["status"] = status;
            let uid = object["metadata"].get("uid").cloned();
            self.store(&path, object, uid);
        }
        let path = request.path.as_str();
        match request.method.as_str() {
            "GET" => match self.objects.get(path) {
                Some(object) => (StatusCode::OK, object.clone()),
                None if PLURALS.iter().any(|(_, plural)| path.ends_with(&format!("/{plural}"))) => {
                    let prefix = format!("{path}/");
                    let items: Vec<Value> = self
                        .objects
                        .iter()
                        .filter(|(p, _)| p.starts_with(&prefix) && !p[prefix.len()..].contains('/'))
                        .map(|(_, o)| o.clone())
                        .collect();
                    (
                        StatusCode::OK,
                        json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}),
                    )
                }
                None => not_found(path),
            },
            "PATCH" if path.ends_with("/status") => {
                let owner = path.trim_end_matches("/status");
                let Some(mut object) = self.objects.get(owner).cloned() else { return not_found(owner) };
                object["status"] = request.body["status"].clone();
                let uid = object["metadata"].get("uid").cloned();
                (StatusCode::OK, self.store(owner, object, uid))
            }
            "PATCH" if request.is_apply() => {
                let previous = self.objects.get(path).cloned();
                if self.applied.get(path) == Some(&request.body)
                    && let Some(previous) = previous
                {
                    return (StatusCode::OK, previous);
                }
                self.applied.insert(path.to_owned(), request.body.clone());
                let uid = previous.and_then(|p| p["metadata"].get("uid").cloned());
                (StatusCode::OK, self.store(path, request.body.clone(), uid))
            }
            // JSON patches (the finalizer): the tests read the request, the answer is the object.
            "PATCH" => match self.objects.get(path) {
                Some(object) => (StatusCode::OK, object.clone()),
                None => not_found(path),
            },
            // Kept under its name, as the API server keeps it, so a later PATCH finds it.
            "POST" => {
                let name = request.body["metadata"]["name"].as_str().unwrap_or_default();
                let created = self.store(&format!("{path}/{name}"), request.body.clone(), None);
                (StatusCode::CREATED, created)
            }
            "DELETE" => match self.objects.remove(path) {
                Some(object) => (StatusCode::OK, object),
                None => not_found(path),
            },
            method => panic!("the fake API server does not serve {method}"),
        }
    }
}

impl FakeApi {
    /// A client talking to a fake API server that holds `objects`, each as applied by us
    /// before (so applying it again unchanged writes nothing).
    pub fn start(objects: impl IntoIterator<Item = Value>) -> (Client, FakeApi) {
        let mut state = State::default();
        for object in objects {
            let path = path_of(&object);
            state.applied.insert(path.clone(), object.clone());
            let uid = object["metadata"].get("uid").cloned();
            state.store(&path, object, uid);
        }
        let state = Arc::new(Mutex::new(state));
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server_state = state.clone();
        tokio::spawn(async move {
            while let Some((request, respond)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = body.collect().await.expect("request body").to_bytes();
                let query = parts
                    .uri
                    .query()
                    .unwrap_or("")
                    .split('&')
                    .filter(|pair| !pair.is_empty())
                    .map(|pair| {
                        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                        (k.to_owned(), v.to_owned())
                    })
                    .collect();
                let recorded = Recorded {
                    method: parts.method.to_string(),
                    path: parts.uri.path().to_owned(),
                    query,
                    content_type: parts
                        .headers
                        .get(http::header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned(),
                    body: if bytes.is_empty() {
                        Value::Null
                    } else {
                        serde_json::from_slice(&bytes).expect("JSON body")
                    },
                };
                let (status, answer) = {
                    let mut state = server_state.lock().expect("state");
                    let answer = state.answer(&recorded);
                    state.requests.push(recorded);
                    answer
                };
                let response = Response::builder()
                    .status(status)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).expect("serializes")))
                    .expect("response");
                respond.send_response(response);
            }
        });
        (Client::new(service, "default"), FakeApi { state })
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().expect("state").requests.clone()
    }

    /// The requests as `METHOD /path` lines, in order.
    pub fn story(&self) -> Vec<String> {
        self.requests().iter().map(Recorded::line).collect()
    }

    pub fn writes(&self) -> Vec<Recorded> {
        self.requests().into_iter().filter(|r| r.method != "GET").collect()
    }

    pub fn object(&self, path: &str) -> Option<Value> {
        self.state.lock().expect("state").objects.get(path).cloned()
    }

    /// The server answers `method path` with `code` from now on.
    // Each test crate compiles this module on its own; only reconcile.rs needs this.
    #[allow(dead_code)]
    pub fn refuse(&self, method: &str, path: &str, code: u16) {
        self.state.lock().expect("state").refused.insert(format!("{method} {path}"), code);
    }

    /// Another controller writes `status` on the object at `path` (the StatefulSet
    /// controller counting ready pods) just before the server answers `when`
    /// (`METHOD /path`): between two requests of the operator's, as on a live server.
    // Each test crate compiles this module on its own; only reconcile.rs needs this.
    #[allow(dead_code)]
    pub fn meanwhile(&self, when: &str, path: &str, status: Value) {
        self.state.lock().expect("state").meanwhile.push((when.to_owned(), path.to_owned(), status));
    }

    /// What another controller does behind the operator's back (the StatefulSet controller
    /// deleting the pods of a shrunk StatefulSet): gone, without a request of ours.
    // Each test crate compiles this module on its own; only scaling.rs needs this.
    #[allow(dead_code)]
    pub fn vanish(&self, path: &str) {
        self.state.lock().expect("state").objects.remove(path);
    }

    /// The other way round: an object another controller created (the StatefulSet
    /// controller's pods and volume claims), there without a request of ours.
    // Each test crate compiles this module on its own; only scaling.rs needs this.
    #[allow(dead_code)]
    pub fn put(&self, object: Value) {
        let mut state = self.state.lock().expect("state");
        state.store(&path_of(&object), object, None);
    }
}
