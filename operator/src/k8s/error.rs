use crate::resources::BuildError;

/// Why a reconcile failed. Each variant is one value of the `reason` label of
/// `consensus_operator_reconcile_errors_total`, so alerts can tell an API outage from a bug.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[source] kube::Error),
    #[error("publishing an event failed: {0}")]
    Event(#[source] kube::Error),
    #[error("building the desired objects: {0}")]
    Build(#[from] BuildError),
    #[error("serializing status: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("changing the membership: {0}")]
    Membership(#[from] crate::membership::MembershipError),
    #[error("starting a backup: {0}")]
    Backup(String),
    #[error("recovering from quorum loss: {0}")]
    Recovery(String),
    #[error("adding or removing the finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube_api",
            Self::Event(_) => "event",
            Self::Build(_) => "build",
            Self::Serialize(_) => "serialize",
            Self::Membership(_) => "membership",
            Self::Backup(_) => "backup",
            Self::Recovery(_) => "recovery",
            Self::Finalizer(inner) => match inner.as_ref() {
                // The reconcile's own error, wrapped by the finalizer helper: report its cause.
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.metric_label(),
                _ => "finalizer",
            },
        }
    }
}

impl From<kube::Error> for Error {
    fn from(error: kube::Error) -> Self {
        Self::Kube(error)
    }
}
