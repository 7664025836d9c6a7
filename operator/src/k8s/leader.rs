//! One active operator among its replicas, elected through a coordination.k8s.io Lease.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::watcher::watch_object;
use kube::{Api, Client};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

pub const LEASE_NAME: &str = "consensus-operator";
/// A standby takes over at most this long after the leader vanished without releasing.
const LEASE_SECONDS: u64 = 15;
/// The holder renews this long before expiry, covering clock skew between nodes.
const RENEW_BEFORE_SECONDS: u64 = 5;

pub struct Election {
    client: Client,
    namespace: String,
    identity: String,
    leading: watch::Receiver<bool>,
    task: JoinHandle<Result<LeaseManager, LeaseManagerError>>,
    /// Signalled when the Lease has no holder: a leader that stops gives it up, and the
    /// lease manager would otherwise sleep until the expiry it last saw (up to
    /// LEASE_SECONDS), long enough for a replica started after it to take the lease first.
    freed: Arc<Notify>,
    lease_watch: JoinHandle<()>,
}

impl Election {
    pub async fn start(client: Client, namespace: &str, identity: &str) -> Result<Self, LeaseManagerError> {
        let (leading, task) = manage(client.clone(), namespace, identity).await?;
        let freed = Arc::new(Notify::new());
        let lease_watch =
            tokio::spawn(watch_for_no_holder(client.clone(), namespace.to_owned(), freed.clone()));
        Ok(Self {
            client,
            namespace: namespace.to_owned(),
            identity: identity.to_owned(),
            leading,
            task,
            freed,
            lease_watch,
        })
    }

    /// Resolves once this replica holds the lease.
    pub async fn acquired(&mut self) -> anyhow::Result<()> {
        loop {
            let freed = tokio::select! {
                leading = self.leading.wait_for(|&leading| leading) => {
                    leading.map_err(|_| anyhow::anyhow!("the lease manager stopped"))?;
                    false
                }
                () = self.freed.notified() => true,
            };
            if !freed {
                return Ok(());
            }
            // Not holding anything, the sleeping manager is dropped, and a new one asks for
            // the free lease at once.
            debug!(identity = %self.identity, "the lease was given up; asking for it now");
            self.task.abort();
            (self.leading, self.task) = manage(self.client.clone(), &self.namespace, &self.identity).await?;
        }
    }

    /// Resolves when this replica stops holding the lease.
    pub async fn lost(&mut self) {
        let _ = self.leading.wait_for(|&leading| !leading).await;
    }

    /// Gives the lease up so a standby takes over at once instead of after it expires.
    pub async fn release(self) {
        self.lease_watch.abort();
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

async fn manage(
    client: Client,
    namespace: &str,
    identity: &str,
) -> Result<(watch::Receiver<bool>, JoinHandle<Result<LeaseManager, LeaseManagerError>>), LeaseManagerError> {
    let manager = LeaseManagerBuilder::new(client, LEASE_NAME)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(LEASE_SECONDS)
        .with_grace(RENEW_BEFORE_SECONDS)
        .build()
        .await?;
    Ok(manager.watch().await)
}

/// Notifies `freed` whenever the Lease exists without a holder. The watch restarts itself
/// after errors (watch_object retries), so a failure here only costs the fast takeover.
async fn watch_for_no_holder(client: Client, namespace: String, freed: Arc<Notify>) {
    let leases = Api::<Lease>::namespaced(client, &namespace);
    let mut changes = std::pin::pin!(watch_object(leases, LEASE_NAME));
    while let Some(change) = changes.next().await {
        match change {
            Ok(Some(lease)) if has_no_holder(&lease) => freed.notify_one(),
            Ok(_) => {}
            Err(error) => {
                debug!(%error, "watching the lease");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

fn has_no_holder(lease: &Lease) -> bool {
    lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref()).is_none_or(str::is_empty)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::coordination::v1::LeaseSpec;

    use super::*;

    #[test]
    fn a_lease_is_free_when_it_names_no_holder() {
        let lease = |holder: Option<&str>| Lease {
            spec: Some(LeaseSpec { holder_identity: holder.map(str::to_owned), ..LeaseSpec::default() }),
            ..Lease::default()
        };
        assert!(has_no_holder(&lease(None)));
        assert!(has_no_holder(&lease(Some(""))));
        assert!(!has_no_holder(&lease(Some("consensus-operator-abc"))));
        assert!(has_no_holder(&Lease::default()));
    }
}
