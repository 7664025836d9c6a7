//! The generated CRD as the API server sees it: its CEL rules evaluated with a real CEL
//! implementation, its defaults applied the way the API server applies them, and the
//! committed YAML checked against the Rust types.

use cel_interpreter::{Context, Program, Value};
use consensus_crds::{
    ConsensusBackup, ConsensusCluster, ConsensusClusterSpec, IMMUTABLE_RULE_MESSAGE, REPLICAS_RULE_MESSAGE,
    ZoneSpread, validate_spec,
};
use kube::CustomResourceExt;
use serde_json::{Value as Json, json};

const COMMITTED_CRD: &str = include_str!("../../manifests/crds/consensus.dev_consensusclusters.yaml");
const COMMITTED_BACKUP_CRD: &str = include_str!("../../manifests/crds/consensus.dev_consensusbackups.yaml");

fn schema() -> Json {
    let crd = serde_json::to_value(ConsensusCluster::crd()).expect("crd serializes");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

fn backup_schema() -> Json {
    let crd = serde_json::to_value(ConsensusBackup::crd()).expect("crd serializes");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// The schema node at a path of property names below the root.
fn node<'a>(schema: &'a Json, path: &[&str]) -> &'a Json {
    path.iter().fold(schema, |at, name| &at["properties"][*name])
}

struct Rule {
    rule: String,
    message: String,
}

fn rules_at(schema: &Json, path: &[&str]) -> Vec<Rule> {
    node(schema, path)["x-kubernetes-validations"]
        .as_array()
        .unwrap_or_else(|| panic!("no CEL rules at {path:?}"))
        .iter()
        .map(|r| Rule {
            rule: r["rule"].as_str().expect("rule text").to_owned(),
            message: r["message"].as_str().expect("rule message").to_owned(),
        })
        .collect()
}

/// JSON as the API server hands it to CEL: schema `integer`s are CEL `int` (signed),
/// never `uint`.
fn to_cel(value: &Json) -> Value {
    match value {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(n.as_f64().expect("finite number")),
        },
        Json::String(s) => Value::String(s.clone().into()),
        Json::Array(items) => Value::List(items.iter().map(to_cel).collect::<Vec<_>>().into()),
        Json::Object(fields) => {
            let map: std::collections::HashMap<String, Value> =
                fields.iter().map(|(k, v)| (k.clone(), to_cel(v))).collect();
            Value::Map(map.into())
        }
    }
}

/// Evaluates every rule with `self` bound to `value` as on create, where the API server
/// skips transition rules (those that read `oldSelf`); the messages of the rules that fail.
fn failures(rules: &[Rule], value: Json) -> Vec<String> {
    let on_create: Vec<&Rule> = rules.iter().filter(|r| !r.rule.contains("oldSelf")).collect();
    on_create.into_iter().filter_map(|r| evaluate(r, &value, None)).collect()
}

/// One rule with `self` (and on an update `oldSelf`) bound: its message when it fails.
fn evaluate(r: &Rule, value: &Json, old: Option<&Json>) -> Option<String> {
    let program = Program::compile(&r.rule).expect("rule compiles");
    let mut ctx = Context::default();
    ctx.add_variable_from_value("self", to_cel(value));
    if let Some(old) = old {
        ctx.add_variable_from_value("oldSelf", to_cel(old));
    }
    match program.execute(&ctx).expect("rule evaluates") {
        Value::Bool(true) => None,
        Value::Bool(false) => Some(r.message.clone()),
        other => panic!("rule {} returned a non-boolean {other:?}", r.rule),
    }
}

#[test]
fn replicas_rule_accepts_odd_counts_from_one_to_nine() {
    let rules = rules_at(&schema(), &["spec", "replicas"]);
    for n in [1, 3, 5, 7, 9] {
        assert_eq!(failures(&rules, json!(n)), Vec::<String>::new(), "{n} must be accepted");
    }
}

#[test]
fn replicas_rule_rejects_even_zero_negative_and_large_counts_with_the_reason() {
    let rules = rules_at(&schema(), &["spec", "replicas"]);
    for n in [0, 2, 4, 6, 8, 10, 11, -1, -2, -3] {
        assert_eq!(
            failures(&rules, json!(n)),
            vec![REPLICAS_RULE_MESSAGE.to_owned()],
            "{n} must be rejected"
        );
    }
    assert!(REPLICAS_RULE_MESSAGE.contains("odd number between 1 and 9"));
}

#[test]
fn backup_destination_rule_wants_exactly_one_destination() {
    let rules = rules_at(&schema(), &["spec", "backup", "destination"]);
    let s3 = json!({"bucket": "b", "credentialsSecret": {"name": "s"}});
    let volume = json!({"claimName": "backups"});
    assert!(failures(&rules, json!({ "s3": s3 })).is_empty());
    assert!(failures(&rules, json!({ "volume": volume })).is_empty());
    assert_eq!(failures(&rules, json!({})).len(), 1);
    assert_eq!(failures(&rules, json!({ "s3": s3, "volume": volume })).len(), 1);
}

/// Structural defaulting as the API server does it: a missing property with a `default`
/// gets that default, then defaulting continues inside objects and array items.
fn apply_defaults(schema: &Json, value: &mut Json) {
    match value {
        Json::Object(fields) => {
            if let Some(props) = schema["properties"].as_object() {
                for (name, prop) in props {
                    if !fields.contains_key(name)
                        && let Some(default) = prop.get("default")
                    {
                        fields.insert(name.clone(), default.clone());
                    }
                    if let Some(child) = fields.get_mut(name) {
                        apply_defaults(prop, child);
                    }
                }
            }
        }
        Json::Array(items) => {
            for item in items {
                apply_defaults(&schema["items"], item);
            }
        }
        _ => {}
    }
}

#[test]
fn schema_defaults_match_the_rust_defaults() {
    let schema = schema();
    let mut object = json!({
        "apiVersion": "consensus.dev/v1alpha1",
        "kind": "ConsensusCluster",
        "metadata": {"name": "demo"},
        "spec": {"backup": {"schedule": "@daily", "destination": {"s3": {"bucket": "bkt", "credentialsSecret": {"name": "s3"}}}}}
    });
    apply_defaults(&schema, &mut object);
    let spec = &object["spec"];
    assert_eq!(spec["replicas"], 3);
    assert_eq!(spec["storage"]["size"], "1Gi");
    assert_eq!(spec["storage"]["reclaimPolicy"], "Retain");
    assert_eq!(spec["placement"]["zoneTopologyKey"], "topology.kubernetes.io/zone");
    assert_eq!(spec["placement"]["zoneSpread"], "Required");
    assert_eq!(spec["recovery"]["autoRestore"], false);
    assert_eq!(spec["recovery"]["quorumLossTimeout"], "10m");
    assert_eq!(spec["backup"]["retention"]["maxCount"], 7);
    assert_eq!(spec["backup"]["destination"]["s3"]["region"], "us-east-1");
    assert_eq!(
        spec["backup"]["destination"]["s3"]["credentialsSecret"]["accessKeyIdKey"],
        "AWS_ACCESS_KEY_ID"
    );

    // What the API server stores and what serde fills in for an omitted field are the same.
    let defaulted: ConsensusClusterSpec =
        serde_json::from_value(spec.clone()).expect("defaulted spec parses");
    let minimal: ConsensusClusterSpec = serde_json::from_value(
        json!({"backup": {"schedule": "@daily", "destination": {"s3": {"bucket": "bkt", "credentialsSecret": {"name": "s3"}}}}}),
    )
    .expect("minimal spec parses");
    assert_eq!(defaulted, minimal);
    assert_eq!(minimal.placement.zone_spread, ZoneSpread::Required);
    assert!(validate_spec(&minimal).is_empty());
}

#[test]
fn schema_has_scale_and_status_subresources_and_printer_columns() {
    let crd = serde_json::to_value(ConsensusCluster::crd()).expect("crd serializes");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(crd["spec"]["group"], "consensus.dev");
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["cc"]));
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(version["name"], "v1alpha1");
    assert_eq!(version["subresources"]["status"], json!({}));
    assert_eq!(version["subresources"]["scale"]["specReplicasPath"], ".spec.replicas");
    assert_eq!(version["subresources"]["scale"]["statusReplicasPath"], ".status.replicas");
    assert_eq!(version["subresources"]["scale"]["labelSelectorPath"], ".status.selector");
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .expect("printer columns")
        .iter()
        .map(|c| c["name"].as_str().expect("column name"))
        .collect();
    assert_eq!(columns, ["Replicas", "Ready", "Leader", "Phase", "Version", "Age"]);
}

#[test]
fn conditions_merge_by_type_under_server_side_apply() {
    let conditions = node(&schema(), &["status", "conditions"]).clone();
    assert_eq!(conditions["x-kubernetes-list-type"], "map", "{conditions}");
    assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
    // A map key must be required, or the API server refuses the CRD.
    assert!(conditions["items"]["required"].as_array().is_some_and(|r| r.contains(&json!("type"))));
}

#[test]
fn committed_crds_match_the_rust_types() {
    let generated = serde_yaml::to_string(&ConsensusCluster::crd()).expect("crd renders");
    assert!(
        generated == COMMITTED_CRD,
        "manifests/crds/consensus.dev_consensusclusters.yaml is stale: run `make crds` and commit the result"
    );
    let generated = serde_yaml::to_string(&ConsensusBackup::crd()).expect("crd renders");
    assert!(
        generated == COMMITTED_BACKUP_CRD,
        "manifests/crds/consensus.dev_consensusbackups.yaml is stale: run `make crds` and commit the result"
    );
}

/// Every CEL rule of the schema, evaluated wherever `value` has a field it applies to, as
/// the API server does on create. Messages of the rules that fail, with their path.
fn all_rule_failures(schema: &Json, value: &Json, path: &str) -> Vec<String> {
    let mut failed = Vec::new();
    if let Some(rules) = schema.get("x-kubernetes-validations").and_then(Json::as_array) {
        let rules: Vec<Rule> = rules
            .iter()
            .map(|r| Rule {
                rule: r["rule"].as_str().unwrap_or_default().to_owned(),
                message: r["message"].as_str().unwrap_or_default().to_owned(),
            })
            .collect();
        failed.extend(failures(&rules, value.clone()).into_iter().map(|m| format!("{path}: {m}")));
    }
    match value {
        Json::Object(fields) => {
            for (name, child) in fields {
                if let Some(prop) = schema["properties"].get(name) {
                    failed.extend(all_rule_failures(prop, child, &format!("{path}.{name}")));
                }
            }
        }
        Json::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                failed.extend(all_rule_failures(&schema["items"], item, &format!("{path}[{i}]")));
            }
        }
        _ => {}
    }
    failed
}

#[test]
fn every_sample_passes_the_cel_rules_and_the_operators_own_checks() {
    let schema = schema();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/samples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("samples directory") {
        let path = entry.expect("directory entry").path();
        if path.file_name().is_some_and(|n| n == "kustomization.yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("sample readable");
        let mut object: Json = serde_yaml::from_str(&text).expect("sample is YAML");
        apply_defaults(&schema, &mut object);
        assert_eq!(all_rule_failures(&schema, &object, ""), Vec::<String>::new(), "{}", path.display());
        let cluster: ConsensusCluster =
            serde_json::from_value(object).expect("sample parses as ConsensusCluster");
        assert_eq!(validate_spec(&cluster.spec), vec![], "{}", path.display());
        checked += 1;
    }
    assert_eq!(checked, 4, "expected the four documented samples");
}

#[test]
fn cel_rules_reject_an_even_cluster_wherever_it_appears_in_an_object() {
    let object = json!({"spec": {"replicas": 4}});
    let failed = all_rule_failures(&schema(), &object, "");
    assert_eq!(failed, vec![format!(".spec.replicas: {REPLICAS_RULE_MESSAGE}")]);
}

#[test]
fn readme_references_match_the_types() {
    let readme =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README.md readable");
    for (marker, kind, schema) in [
        ("crd-reference", "ConsensusCluster", schema()),
        ("backup-crd-reference", "ConsensusBackup", backup_schema()),
    ] {
        let start = format!("<!-- {marker}:start -->\n");
        let section = readme
            .split_once(&start)
            .and_then(|(_, rest)| rest.split_once(&format!("<!-- {marker}:end -->")))
            .map(|(section, _)| section)
            .unwrap_or_else(|| panic!("README has the {marker} markers"));
        assert!(
            section == consensus_crds::reference_markdown(&schema),
            "README.md's {kind} reference is stale: run `make crds` and commit the result"
        );
    }
}

#[test]
fn a_consensus_backup_names_its_cluster_and_cannot_change() {
    let crd = serde_json::to_value(ConsensusBackup::crd()).expect("crd serializes");
    assert_eq!(crd["spec"]["group"], "consensus.dev");
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["cb"]));
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["versions"][0]["subresources"]["status"], json!({}));
    let schema = backup_schema();
    assert_eq!(schema["properties"]["spec"]["required"], json!(["clusterName"]));
    let rules = rules_at(&schema, &["spec"]);
    let asked = json!({"clusterName": "demo"});
    // On create the transition rule does not apply; on an update any change is refused.
    assert_eq!(failures(&rules, asked.clone()), Vec::<String>::new());
    let same: Vec<String> = rules.iter().filter_map(|r| evaluate(r, &asked, Some(&asked))).collect();
    assert_eq!(same, Vec::<String>::new());
    let moved = json!({"clusterName": "other"});
    let changed: Vec<String> = rules.iter().filter_map(|r| evaluate(r, &moved, Some(&asked))).collect();
    assert_eq!(changed, vec![IMMUTABLE_RULE_MESSAGE.to_owned()]);
}
