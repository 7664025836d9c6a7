//! Container environment: `env`, `envFrom`, the downward API fields and `$(VAR)` expansion,
//! resolved the way the real kubelet does (later entries see earlier ones; unknown references
//! stay as written; `$$` is an escaped `$`).

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Container, Pod};

/// The ConfigMap and Secret data a pod's containers refer to, fetched beforehand so that the
/// resolution itself stays a pure function.
#[derive(Default, Debug, Clone)]
pub struct Sources {
    pub config_maps: BTreeMap<String, BTreeMap<String, String>>,
    pub secrets: BTreeMap<String, BTreeMap<String, String>>,
}

/// What the pod adds besides its spec: the values only known once it runs.
pub struct PodFacts<'a> {
    pub pod: &'a Pod,
    pub pod_ip: &'a str,
    pub host_ip: &'a str,
    /// KUBERNETES_SERVICE_HOST / PORT for in-cluster clients.
    pub api_host: &'a str,
    pub api_port: u16,
}

/// Expands `$(NAME)` from `vars`; `$$` becomes `$`; a reference to an unknown name, or an
/// unterminated one, is left as written (Kubernetes' `expansion.Expand`).
pub fn expand(input: &str, vars: &dyn Fn(&str) -> Option<String>) -> String {
    let bytes = input.as_bytes();
    let mut out = String::with_capacity(input.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' && i + 1 < bytes.len() {
            match bytes[i + 1] {
                b'$' => {
                    out.push('$');
                    i += 2;
                    continue;
                }
                b'(' => {
                    if let Some(end) = input[i + 2..].find(')') {
                        let name = &input[i + 2..i + 2 + end];
                        match vars(name) {
                            Some(value) => out.push_str(&value),
                            None => out.push_str(&input[i..i + 3 + end]),
                        }
                        i += 3 + end;
                        continue;
                    }
                    // No closing parenthesis: the rest is literal.
                    out.push_str(&input[i..]);
                    return out;
                }
                _ => {}
            }
        }
        let ch = input[i..].chars().next().expect("index is on a char boundary");
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// The value of a downward-API `fieldRef` for an env var.
pub fn field_value(facts: &PodFacts<'_>, path: &str) -> Result<String> {
    let meta = &facts.pod.metadata;
    let spec = facts.pod.spec.as_ref();
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => {
            spec.and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".to_owned())
        }
        "status.podIP" => facts.pod_ip.to_owned(),
        "status.podIPs" => facts.pod_ip.to_owned(),
        "status.hostIP" | "status.hostIPs" => facts.host_ip.to_owned(),
        other => {
            if let Some(key) = label_key(other, "metadata.labels") {
                meta.labels.as_ref().and_then(|l| l.get(key)).cloned().unwrap_or_default()
            } else if let Some(key) = label_key(other, "metadata.annotations") {
                meta.annotations.as_ref().and_then(|l| l.get(key)).cloned().unwrap_or_default()
            } else {
                bail!("unsupported fieldRef {other}")
            }
        }
    })
}

/// `metadata.labels['key']` -> `key`.
fn label_key<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    path.strip_prefix(prefix)?.strip_prefix("['")?.strip_suffix("']")
}

/// The container's environment in order, every value expanded against the ones before it.
pub fn resolve(
    container: &Container,
    facts: &PodFacts<'_>,
    sources: &Sources,
) -> Result<Vec<(String, String)>> {
    let mut order: Vec<String> = Vec::new();
    let mut values: BTreeMap<String, String> = BTreeMap::new();
    let set =
        |name: String, value: String, order: &mut Vec<String>, values: &mut BTreeMap<String, String>| {
            if !values.contains_key(&name) {
                order.push(name.clone());
            }
            values.insert(name, value);
        };
    // Service variables first: the pod's own entries override them.
    set("KUBERNETES_SERVICE_HOST".into(), facts.api_host.to_owned(), &mut order, &mut values);
    set("KUBERNETES_SERVICE_PORT".into(), facts.api_port.to_string(), &mut order, &mut values);
    set("KUBERNETES_SERVICE_PORT_HTTPS".into(), facts.api_port.to_string(), &mut order, &mut values);
    let kube_url = format!("tcp://{}:{}", facts.api_host, facts.api_port);
    set("KUBERNETES_PORT".into(), kube_url.clone(), &mut order, &mut values);
    let proto = format!("KUBERNETES_PORT_{}_TCP", facts.api_port);
    set(proto.clone(), kube_url, &mut order, &mut values);
    set(format!("{proto}_PROTO"), "tcp".into(), &mut order, &mut values);
    set(format!("{proto}_PORT"), facts.api_port.to_string(), &mut order, &mut values);
    set(format!("{proto}_ADDR"), facts.api_host.to_owned(), &mut order, &mut values);

    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let (data, optional, what) = if let Some(cm) = &from.config_map_ref {
            (
                sources.config_maps.get(&cm.name),
                cm.optional.unwrap_or(false),
                format!("configmap {}", cm.name),
            )
        } else if let Some(s) = &from.secret_ref {
            (sources.secrets.get(&s.name), s.optional.unwrap_or(false), format!("secret {}", s.name))
        } else {
            continue;
        };
        match data {
            Some(data) => {
                for (k, v) in data {
                    set(format!("{prefix}{k}"), v.clone(), &mut order, &mut values);
                }
            }
            None if optional => {}
            None => bail!("{what} not found"),
        }
    }

    for var in container.env.iter().flatten() {
        let value = if let Some(source) = &var.value_from {
            if let Some(field) = &source.field_ref {
                field_value(facts, &field.field_path)?
            } else if let Some(r) = &source.config_map_key_ref {
                match sources.config_maps.get(&r.name).and_then(|d| d.get(&r.key)) {
                    Some(v) => v.clone(),
                    None if r.optional.unwrap_or(false) => continue,
                    None => bail!("couldn't find key {} in ConfigMap {}", r.key, r.name),
                }
            } else if let Some(r) = &source.secret_key_ref {
                match sources.secrets.get(&r.name).and_then(|d| d.get(&r.key)) {
                    Some(v) => v.clone(),
                    None if r.optional.unwrap_or(false) => continue,
                    None => bail!("couldn't find key {} in Secret {}", r.key, r.name),
                }
            } else if let Some(r) = &source.resource_field_ref {
                resource_value(container, &r.resource).with_context(|| format!("env {}", var.name))?
            } else {
                String::new()
            }
        } else {
            let raw = var.value.clone().unwrap_or_default();
            let snapshot = values.clone();
            expand(&raw, &|n| snapshot.get(n).cloned())
        };
        set(var.name.clone(), value, &mut order, &mut values);
    }
    Ok(order.into_iter().map(|n| (n.clone(), values[&n].clone())).collect())
}

/// `resourceFieldRef` for the common cases (limits/requests of cpu and memory), whole units.
fn resource_value(container: &Container, resource: &str) -> Result<String> {
    let res = container.resources.as_ref();
    let (kind, name) = resource.split_once('.').context("resource must be limits.X or requests.X")?;
    let map = match kind {
        "limits" => res.and_then(|r| r.limits.as_ref()),
        "requests" => res.and_then(|r| r.requests.as_ref()),
        _ => bail!("unsupported resource {resource}"),
    };
    Ok(match map.and_then(|m| m.get(name)) {
        Some(q) => q.0.clone(),
        // Unset limits: the node's allocatable in a real kubelet; "0" keeps it simple.
        None => "0".to_owned(),
    })
}

/// `command`/`args` after `$(VAR)` expansion against the resolved environment.
pub fn expand_all(items: &[String], env: &[(String, String)]) -> Vec<String> {
    let lookup = |n: &str| env.iter().rev().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    items.iter().map(|s| expand(s, &lookup)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ConfigMapKeySelector, EnvFromSource, EnvVar, EnvVarSource, ObjectFieldSelector, PodSpec,
        SecretEnvSource,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn vars(n: &str) -> Option<String> {
        match n {
            "A" => Some("alpha".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expansion_follows_kubernetes_rules() {
        assert_eq!(expand("x-$(A)-y", &vars), "x-alpha-y");
        assert_eq!(expand("$(A)$(A)", &vars), "alphaalpha");
        assert_eq!(expand("$(UNKNOWN)", &vars), "$(UNKNOWN)");
        assert_eq!(expand("$$(A)", &vars), "$(A)");
        assert_eq!(expand("$$$(A)", &vars), "$alpha");
        assert_eq!(expand("a$b", &vars), "a$b");
        assert_eq!(expand("tail$", &vars), "tail$");
        assert_eq!(expand("open $(A", &vars), "open $(A");
        assert_eq!(expand("[$(EMPTY)]", &vars), "[]");
        assert_eq!(expand("ünï-$(A)", &vars), "ünï-alpha");
    }

    fn pod() -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web-0".into()),
                namespace: Some("ns1".into()),
                uid: Some("u-1".into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec { node_name: Some("node-1".into()), ..PodSpec::default() }),
            status: None,
        }
    }

    fn field(name: &str, path: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector { field_path: path.into(), api_version: None }),
                ..EnvVarSource::default()
            }),
        }
    }

    fn plain(name: &str, value: &str) -> EnvVar {
        EnvVar { name: name.into(), value: Some(value.into()), value_from: None }
    }

    #[test]
    fn resolves_fields_config_maps_secrets_and_references_in_order() {
        let p = pod();
        let facts = PodFacts {
            pod: &p,
            pod_ip: "10.244.1.5",
            host_ip: "10.244.0.1",
            api_host: "10.244.0.1",
            api_port: 6443,
        };
        let mut sources = Sources::default();
        sources.config_maps.insert("cfg".into(), BTreeMap::from([("k".into(), "v1".into())]));
        sources.secrets.insert("sec".into(), BTreeMap::from([("TOKEN".into(), "s3".into())]));
        let container = Container {
            name: "c".into(),
            env_from: Some(vec![EnvFromSource {
                prefix: Some("S_".into()),
                secret_ref: Some(SecretEnvSource { name: "sec".into(), optional: None }),
                ..EnvFromSource::default()
            }]),
            env: Some(vec![
                field("POD_NAME", "metadata.name"),
                field("IP", "status.podIP"),
                field("NODE", "spec.nodeName"),
                field("SA", "spec.serviceAccountName"),
                EnvVar {
                    name: "CFG".into(),
                    value: None,
                    value_from: Some(EnvVarSource {
                        config_map_key_ref: Some(ConfigMapKeySelector {
                            name: "cfg".into(),
                            key: "k".into(),
                            optional: None,
                        }),
                        ..EnvVarSource::default()
                    }),
                },
                plain("URL", "http://$(POD_NAME):$(LATER)/$(CFG)"),
                plain("LATER", "1"),
                plain("ESC", "$$(POD_NAME)"),
            ]),
            ..Container::default()
        };
        let env = resolve(&container, &facts, &sources).unwrap();
        let get = |n: &str| env.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("POD_NAME"), Some("web-0"));
        assert_eq!(get("IP"), Some("10.244.1.5"));
        assert_eq!(get("NODE"), Some("node-1"));
        assert_eq!(get("SA"), Some("default"));
        assert_eq!(get("CFG"), Some("v1"));
        assert_eq!(get("S_TOKEN"), Some("s3"));
        // LATER is defined after URL, so it is not expanded there (as in Kubernetes).
        assert_eq!(get("URL"), Some("http://web-0:$(LATER)/v1"));
        assert_eq!(get("ESC"), Some("$(POD_NAME)"));
        assert_eq!(get("KUBERNETES_SERVICE_HOST"), Some("10.244.0.1"));
        assert_eq!(get("KUBERNETES_SERVICE_PORT"), Some("6443"));
        let args = expand_all(&["--name=$(POD_NAME)".into(), "$(NOPE)".into()], &env);
        assert_eq!(args, vec!["--name=web-0".to_owned(), "$(NOPE)".to_owned()]);
    }

    #[test]
    fn missing_required_key_is_an_error_and_optional_is_skipped() {
        let p = pod();
        let facts = PodFacts { pod: &p, pod_ip: "", host_ip: "", api_host: "h", api_port: 1 };
        let reference = |optional| EnvVar {
            name: "X".into(),
            value: None,
            value_from: Some(EnvVarSource {
                config_map_key_ref: Some(ConfigMapKeySelector {
                    name: "none".into(),
                    key: "k".into(),
                    optional,
                }),
                ..EnvVarSource::default()
            }),
        };
        let c = Container { name: "c".into(), env: Some(vec![reference(None)]), ..Container::default() };
        assert!(resolve(&c, &facts, &Sources::default()).is_err());
        let c =
            Container { name: "c".into(), env: Some(vec![reference(Some(true))]), ..Container::default() };
        let env = resolve(&c, &facts, &Sources::default()).unwrap();
        assert!(env.iter().all(|(k, _)| k != "X"));
    }
}
