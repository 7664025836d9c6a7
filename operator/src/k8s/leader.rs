//! One active operator among its replicas, elected through a coordination.k8s.io Lease.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

pub const LEASE_NAME: &str = "consensus-operator";
/// A standby takes over at most this long after the leader vanished without releasing.
const LEASE_SECONDS: u64 = 15;
/// The holder renews this long before expiry, covering clock skew between nodes.
const RENEW_BEFORE_SECONDS: u64 = 5;

pub struct Election {
    leading: watch::Receiver<bool>,
    task: JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
}

impl Election {
    pub async fn start(client: Client, namespace: &str, identity: &str) -> Result<Self, LeaseManagerError> {
        let manager = LeaseManagerBuilder::new(client, LEASE_NAME)
            .with_namespace(namespace)
            .with_identity(identity)
            .with_duration(LEASE_SECONDS)
            .with_grace(RENEW_BEFORE_SECONDS)
            .build()
            .await?;
        let (leading, task) = manager.watch().await;
        Ok(Self { leading, task })
    }

    /// Resolves once this replica holds the lease.
    pub async fn acquired(&mut self) -> Result<(), watch::error::RecvError> {
        self.leading.wait_for(|&leading| leading).await.map(|_| ())
    }

    /// Resolves when this replica stops holding the lease.
    pub async fn lost(&mut self) {
        let _ = self.leading.wait_for(|&leading| !leading).await;
    }

    /// Gives the lease up so a standby takes over at once instead of after it expires.
    pub async fn release(self) {
        drop(self.leading);
        match tokio::time::timeout(Duration::from_secs(5), self.task).await {
            Ok(Ok(Ok(_))) => info!("lease released"),
            Ok(Ok(Err(error))) => {
                warn!(%error, "releasing the lease failed; a standby takes over when it expires")
            }
            Ok(Err(error)) => warn!(%error, "lease task failed"),
            Err(_) => warn!("releasing the lease timed out; a standby takes over when it expires"),
        }
    }
}
