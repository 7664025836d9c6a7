//! Prints a CustomResourceDefinition as YAML (`make crds` writes them to manifests/crds/),
//! or with `--reference` the field reference the README carries: `crdgen [cluster|backup]
//! [--reference]`, the ConsensusCluster's when no kind is named.

use consensus_crds::{ConsensusBackup, ConsensusCluster, reference_markdown};
use kube::CustomResourceExt;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: crdgen [cluster|backup] [--reference]";
    let (kind, rest) = match args.first().map(String::as_str) {
        Some("cluster") | Some("backup") => (args[0].as_str(), &args[1..]),
        _ => ("cluster", &args[..]),
    };
    let crd = if kind == "backup" { ConsensusBackup::crd() } else { ConsensusCluster::crd() };
    match rest {
        [] => print!("{}", serde_yaml::to_string(&crd)?),
        [flag] if flag == "--reference" => {
            let crd = serde_json::to_value(&crd)?;
            print!("{}", reference_markdown(&crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]));
        }
        other => return Err(format!("unexpected arguments {other:?}; {usage}").into()),
    }
    Ok(())
}
