use std::path::PathBuf;

/// Why local mode could not start or carry on. Problems with a running cluster are not
/// errors here: they are observed, planned around and reported in the status.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("reading {path}: {source}")]
    ReadSpec { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a ConsensusCluster: {reason}")]
    ParseSpec { path: PathBuf, reason: String },
    #[error(
        "consensus-node not found at {path}: build it with `cargo build -p consensus-node --bin consensus-node`, \
         or pass --node-bin (or set CONSENSUS_NODE_BIN)"
    )]
    NodeBinary { path: PathBuf },
    #[error("locating the operator binary: {0}")]
    CurrentExe(std::io::Error),
    #[error("{action} {path}: {source}")]
    State { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{path} is damaged: {reason}")]
    DamagedState { path: PathBuf, reason: String },
    #[error("finding free loopback ports: {0}")]
    Ports(std::io::Error),
    #[error("starting member {member}: {source}")]
    Spawn { member: String, source: std::io::Error },
    #[error("starting the run of backup {backup}: {source}")]
    SpawnBackup { backup: String, source: std::io::Error },
    /// A backup asked for with `consensus-operator backup` that cannot be asked for, failed,
    /// or was not carried out in time.
    #[error("{0}")]
    Request(String),
    /// A recovery from quorum loss that cannot be carried out as recorded.
    #[error("{0}")]
    Recovery(String),
    #[error("serializing the status: {0}")]
    SerializeStatus(serde_yaml::Error),
}
