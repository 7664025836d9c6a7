//! `consensus-operator run`: the controller, its HTTP endpoints and leader election, wired
//! together and stopped cleanly on SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context as _, anyhow};
use consensus_crds::ConsensusCluster;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::events::Reporter;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use super::events::Events;
use super::http::{Health, serve};
use super::leader::Election;
use super::metrics::Metrics;
use super::reconcile::{Context, error_policy, reconcile};
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
    let metrics = Metrics::shared();
    let health = Arc::new(Health { metrics: metrics.clone(), leading: Default::default() });

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

    let controller = controller(client, metrics, &args.identity, stopped(stopping.clone()));
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

fn controller(
    client: Client,
    metrics: Arc<Metrics>,
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
    Controller::new(Api::<ConsensusCluster>::all(client.clone()), watcher::Config::default())
        .owns(Api::<StatefulSet>::all(client.clone()), ours.clone())
        .owns(Api::<Service>::all(client.clone()), ours.clone())
        .owns(Api::<PodDisruptionBudget>::all(client.clone()), ours.clone())
        .owns(Api::<ConfigMap>::all(client), ours)
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(%error, "controller");
            }
        })
}

async fn stopped(mut stopping: watch::Receiver<bool>) {
    let _ = stopping.wait_for(|&stop| stop).await;
}
