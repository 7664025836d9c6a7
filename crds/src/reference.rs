//! The CRD reference in the README, rendered from the same schema the API server gets, so
//! the documentation cannot drift from the types.

use serde_json::Value;

/// A Markdown table of every field under `spec` and `status` of an openAPIV3Schema:
/// path, type, default and description. Fields of embedded Kubernetes types
/// (resources, tolerations, affinity, conditions) are not expanded.
pub fn reference_markdown(open_api_v3_schema: &Value) -> String {
    let mut out = String::new();
    for section in ["spec", "status"] {
        out.push_str(&format!(
            "\n#### `{section}`\n\n| Field | Type | Default | Description |\n|---|---|---|---|\n"
        ));
        let root = &open_api_v3_schema["properties"][section];
        rows(root, section, &mut out);
    }
    out
}

const NOT_EXPANDED: [&str; 5] = [
    "spec.resources",
    "spec.placement.tolerations",
    "spec.placement.affinity",
    "status.conditions",
    "status.nextBackup",
];

fn rows(node: &Value, path: &str, out: &mut String) {
    let Some(props) = node["properties"].as_object() else { return };
    let required: Vec<&str> =
        node["required"].as_array().map(|r| r.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    for (name, prop) in props {
        let field = format!("{path}.{name}");
        let description = prop["description"].as_str().unwrap_or("").replace('\n', " ").replace('|', "\\|");
        let default = match &prop["default"] {
            Value::Null => String::new(),
            Value::Object(_) | Value::Array(_) => String::new(),
            v => format!("`{v}`"),
        };
        let required = if required.contains(&name.as_str()) { " (required)" } else { "" };
        out.push_str(&format!("| `{field}` | {}{required} | {default} | {description} |\n", type_of(prop)));
        if NOT_EXPANDED.contains(&field.as_str()) {
            continue;
        }
        rows(prop, &field, out);
        if prop["type"] == "array" {
            rows(&prop["items"], &format!("{field}[]"), out);
        }
    }
}

fn type_of(prop: &Value) -> String {
    match (prop["type"].as_str(), prop["enum"].as_array()) {
        (_, Some(values)) => values
            .iter()
            .filter_map(Value::as_str)
            .map(|v| format!("`{v}`"))
            .collect::<Vec<_>>()
            .join(" \\| "),
        (Some("array"), _) => format!("[]{}", type_of(&prop["items"])),
        (Some("object"), _) if prop.get("additionalProperties").is_some() => "map".to_owned(),
        (Some(t), _) => t.to_owned(),
        (None, _) => "object".to_owned(),
    }
}
