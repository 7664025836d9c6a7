//! Prints the ConsensusCluster CustomResourceDefinition as YAML (`make crds` writes it to
//! manifests/crds/).

use consensus_crds::ConsensusCluster;
use kube::CustomResourceExt;

fn main() -> Result<(), serde_yaml::Error> {
    print!("{}", serde_yaml::to_string(&ConsensusCluster::crd())?);
    Ok(())
}
