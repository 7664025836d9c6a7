//! `consensus-operator run`: the controller, its HTTP endpoints and leader election, wired
//! together and stopped cleanly on SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context as _, anyhow};
use consensus_crds::{ConsensusBackup, ConsensusCluster};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::ListParams;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::apply::managed_content;
use super::events::Events;
use super::http::{Health, serve};
use super::leader::Election;
use super::metrics::Metrics;
use super::reconcile::{Context, error_policy, reconcile};
use super::{requests, triggers};
use crate::membership::EtcdMembers;
use crate::resources::labels;

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Namespace of the leader-election Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "consensus-system")]
    pub namespace: String,
    /// This replica's name in the Lease and in Events.
    #[arg(long, env = "POD_NAME", default_value = "consensus-operator")]
    pub identity: String,
    /// Reconcile at once without taking the Lease: only for a single operator run by hand.
    #[arg(long)]
    pub no_leader_election: bool,
}

pub async fn run(
    args: RunArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("no Kubernetes API in reach: run in a cluster or set KUBECONFIG")?;
    require_crd(&client).await?;
    let metrics = Metrics::shared();
    let health = Arc::new(Health::new(metrics.clone()));

    let (stop, stopping) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        info!("stopping");
        let _ = stop.send(true);
    });
    let listener = TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("binding {}", args.metrics_addr))?;
    let server = tokio::spawn(serve(listener, health.clone(), stopped(stopping.clone())));

    let mut election = if args.no_leader_election {
        None
    } else {
        let mut election = Election::start(client.clone(), &args.namespace, &args.identity)
            .await
            .context("starting leader election")?;
        info!(identity = %args.identity, "waiting for the lease");
        tokio::select! {
            acquired = election.acquired() => acquired.context("leader election stopped")?,
            () = stopped(stopping.clone()) => {
                election.release().await;
                return Ok(());
            }
        }
        Some(election)
    };
    info!(identity = %args.identity, "leading: reconciling ConsensusClusters");
    health.leading.store(true, Ordering::Relaxed);

    let controller = controller(client, metrics, health.clone(), &args.identity, stopped(stopping.clone()));
    let outcome = match election.as_mut() {
        Some(election) => tokio::select! {
            () = controller => Ok(()),
            () = election.lost() => Err(anyhow!("lost the lease; exiting so that only one replica reconciles")),
        },
        None => {
            controller.await;
            Ok(())
        }
    };
    health.leading.store(false, Ordering::Relaxed);
    if let Some(election) = election {
        election.release().await;
    }
    server.abort();
    outcome
}

/// Fails unless the API server serves ConsensusClusters and ConsensusBackups: without a CRD
/// its watch fails for ever, and a replica that says so at start and exits is plainer than
/// one that runs.
pub async fn require_crd(client: &Client) -> anyhow::Result<()> {
    require::<ConsensusCluster>(client).await?;
    require::<ConsensusBackup>(client).await
}

async fn require<K>(client: &Client) -> anyhow::Result<()>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let crd = format!("{}.{}", K::plural(&()), K::group(&()));
    match Api::<K>::all(client.clone()).list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Err(anyhow!(
            "the CustomResourceDefinition {crd} is not installed: kubectl apply -k manifests/ \
             (or kubectl apply -f manifests/crds/)"
        )),
        Err(error) => Err(error).with_context(|| format!("listing {crd} to check that the CRD is served")),
    }
}

fn controller(
    client: Client,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    identity: &str,
    stop: impl Future<Output = ()> + Send + Sync + 'static,
) -> impl Future<Output = ()> {
    let reporter = Reporter { controller: labels::MANAGER.to_owned(), instance: Some(identity.to_owned()) };
    let context = Arc::new(Context {
        client: client.clone(),
        recorder: Events::new(client.clone(), reporter),
        members: EtcdMembers::default(),
        metrics,
    });
    // Only objects we made: a cluster-wide watch of every Service and ConfigMap would cost
    // memory for nothing.
    let ours = watcher::Config::default().labels(&format!("{}={}", labels::MANAGED_BY, labels::MANAGER));
    let stop = stop.shared();
    let (clusters, changed) = triggers::clusters(Api::all(client.clone()), health.clone());
    let clusters = Controller::for_stream(changed, clusters)
        .owns_stream(triggers::owned(
            Api::<StatefulSet>::all(client.clone()),
            ours.clone(),
            health.clone(),
            triggers::stateful_set_fingerprint,
        ))
        .owns_stream(triggers::owned(
            Api::<Service>::all(client.clone()),
            ours.clone(),
            health.clone(),
            managed_content::<Service>,
        ))
        .owns_stream(triggers::owned(
            Api::<PodDisruptionBudget>::all(client.clone()),
            ours.clone(),
            health.clone(),
            managed_content::<PodDisruptionBudget>,
        ))
        .owns_stream(triggers::owned(
            Api::<ConfigMap>::all(client.clone()),
            ours.clone(),
            health.clone(),
            managed_content::<ConfigMap>,
        ))
        // By the cluster label, not the owner: a ConsensusBackup owns the Jobs it asked for.
        .watches_stream(
            triggers::owned(Api::<Job>::all(client.clone()), ours, health.clone(), triggers::job_fingerprint),
            |job| triggers::cluster_of(&job),
        )
        .watches_stream(triggers::requests(Api::all(client.clone()), health.clone()), |backup| {
            Some(ObjectRef::new(&backup.spec.cluster_name).within(&backup.namespace().unwrap_or_default()))
        })
        .graceful_shutdown_on(stop.clone())
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            match result {
                Ok(_) => {}
                // A ConsensusBackup naming a cluster that does not exist: its own status
                // says so (requests::check_cluster).
                Err(controller::Error::ObjectNotFound(object)) => {
                    debug!(%object, "no such ConsensusCluster");
                }
                Err(error) => warn!(%error, "controller"),
            }
        });
    // The requests no cluster takes, for their status to say so.
    let unclaimed = Controller::new(Api::<ConsensusBackup>::all(client.clone()), watcher::Config::default())
        .graceful_shutdown_on(stop)
        .run(requests::check_cluster, requests::error_policy, Arc::new(client))
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(%error, "ConsensusBackup controller");
            }
        });
    futures::future::join(clusters, unclaimed).map(|_| ())
}

async fn stopped(mut stopping: watch::Receiver<bool>) {
    let _ = stopping.wait_for(|&stop| stop).await;
}
