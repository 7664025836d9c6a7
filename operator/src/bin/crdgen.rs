//! Prints the ConsensusCluster CustomResourceDefinition as YAML (`make crds` writes it to
//! manifests/crds/), or with `--reference` the field reference the README carries.

use consensus_crds::{ConsensusCluster, reference_markdown};
use kube::CustomResourceExt;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let crd = ConsensusCluster::crd();
    match std::env::args().nth(1).as_deref() {
        None => print!("{}", serde_yaml::to_string(&crd)?),
        Some("--reference") => {
            let crd = serde_json::to_value(&crd)?;
            print!("{}", reference_markdown(&crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]));
        }
        Some(other) => return Err(format!("unknown argument {other:?}; usage: crdgen [--reference]").into()),
    }
    Ok(())
}
