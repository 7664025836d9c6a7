//! ConsensusBackups: the backups asked for now. The reconcile of the cluster a request
//! names takes it (`plan::backup`) and writes its status; a request naming a cluster that
//! does not exist is looked at here, so its status says so instead of staying empty.

use std::sync::Arc;
use std::time::Duration;

use consensus_crds::{ConsensusBackup, ConsensusCluster};
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::runtime::controller::Action;
use kube::{Api, Client, Resource, ResourceExt};
use tracing::warn;

use super::Error;
use super::apply::apply_status;
use crate::plan::backup::{BackupRequest, unclaimed};

/// A request that has not ended is looked at again this often: its cluster may be created
/// after it, or deleted under it.
const UNCLAIMED_RECHECK: Duration = Duration::from_secs(60);

/// The ConsensusBackups of the cluster `cluster`, ended ones too, but none being deleted.
pub async fn of_cluster(
    client: &Client,
    namespace: &str,
    cluster: &str,
) -> Result<Vec<ConsensusBackup>, Error> {
    let all =
        Api::<ConsensusBackup>::namespaced(client.clone(), namespace).list(&ListParams::default()).await?;
    Ok(all
        .items
        .into_iter()
        .filter(|b| b.spec.cluster_name == cluster && b.meta().deletion_timestamp.is_none())
        .collect())
}

/// A ConsensusBackup as the planner sees it.
pub fn request_of(backup: &ConsensusBackup) -> BackupRequest {
    BackupRequest {
        name: backup.name_any(),
        created: backup.meta().creation_timestamp.as_ref().map_or_else(Timestamp::now, |t| t.0),
        destination: backup.spec.destination.clone(),
        status: backup.status.clone().unwrap_or_default(),
    }
}

/// One look at a request: when its cluster does not exist, its status says so; otherwise
/// the cluster's reconcile takes it.
pub async fn check_cluster(backup: Arc<ConsensusBackup>, client: Arc<Client>) -> Result<Action, Error> {
    let request = request_of(&backup);
    if request.status.ended() {
        return Ok(Action::await_change());
    }
    let namespace = backup.namespace().unwrap_or_default();
    let cluster = &backup.spec.cluster_name;
    // Looked at again while it has not ended, also when its cluster exists: that cluster may
    // be deleted under it, and nothing else would say so.
    if Api::<ConsensusCluster>::namespaced((*client).clone(), &namespace).get_opt(cluster).await?.is_some() {
        return Ok(Action::requeue(UNCLAIMED_RECHECK));
    }
    let status = unclaimed(&request, cluster, &namespace);
    if status != request.status {
        apply_status(&client, &*backup, &status).await?;
    }
    Ok(Action::requeue(UNCLAIMED_RECHECK))
}

pub fn error_policy(backup: Arc<ConsensusBackup>, error: &Error, _client: Arc<Client>) -> Action {
    warn!(backup = %backup.name_any(), %error, "looking at a ConsensusBackup failed; retrying");
    Action::requeue(Duration::from_secs(15))
}
