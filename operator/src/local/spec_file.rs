//! The ConsensusCluster file local mode runs. It is polled rather than watched: one small
//! file read a few times a second costs nothing and needs no platform-specific notifier.

use std::path::{Path, PathBuf};

use consensus_crds::{ConsensusCluster, ConsensusClusterSpec};

use super::LocalError;

/// What the file said the last time it changed.
#[derive(Debug, Clone, PartialEq)]
pub enum Declared {
    Cluster {
        name: String,
        spec: Box<ConsensusClusterSpec>,
        /// The `consensus.dev/recover` annotation: a recovery asked for by hand.
        recover: Option<String>,
    },
    /// The file cannot be read as a ConsensusCluster; the reason is for the user.
    Unreadable(String),
}

pub struct SpecFile {
    path: PathBuf,
    last: Option<String>,
}

impl SpecFile {
    pub fn new(path: &Path) -> Self {
        Self { path: path.to_owned(), last: None }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The declaration when the file's content differs from the last call's, `None` when
    /// unchanged. A file that cannot be read (an editor replacing it) counts as unchanged.
    pub fn changed(&mut self) -> Result<Option<Declared>, LocalError> {
        let content = match std::fs::read_to_string(&self.path) {
            Ok(content) => content,
            Err(source) if self.last.is_none() => {
                return Err(LocalError::ReadSpec { path: self.path.clone(), source });
            }
            Err(_) => return Ok(None),
        };
        if self.last.as_deref() == Some(content.as_str()) {
            return Ok(None);
        }
        let declared = parse(&content);
        self.last = Some(content);
        Ok(Some(declared))
    }
}

pub fn parse(content: &str) -> Declared {
    let cluster: ConsensusCluster = match serde_yaml::from_str(content) {
        Ok(cluster) => cluster,
        Err(err) => return Declared::Unreadable(err.to_string()),
    };
    let recover = cluster.metadata.annotations.and_then(|mut a| a.remove(consensus_crds::RECOVER_ANNOTATION));
    match cluster.metadata.name {
        Some(name) if !name.is_empty() => Declared::Cluster { name, spec: Box::new(cluster.spec), recover },
        _ => Declared::Unreadable("metadata.name is missing".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_samples_parse() {
        let sample = include_str!("../../../manifests/samples/three-members.yaml");
        let Declared::Cluster { name, spec, .. } = parse(sample) else { panic!("sample does not parse") };
        assert_eq!(name, "demo");
        assert_eq!(spec.replicas, 3);
    }

    #[test]
    fn garbage_and_nameless_files_are_unreadable_with_a_reason() {
        assert!(matches!(parse("replicas: [3"), Declared::Unreadable(_)));
        let nameless = "apiVersion: consensus.dev/v1alpha1\nkind: ConsensusCluster\nmetadata: {}\nspec: {}\n";
        assert_eq!(parse(nameless), Declared::Unreadable("metadata.name is missing".to_owned()));
    }
}
