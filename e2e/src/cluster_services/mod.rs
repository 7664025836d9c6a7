//! Cluster services of the local Kubernetes platform, one process per cluster
//! (`process-kubelet cluster-services`): the cluster DNS server (`dns`, `dns_server`) and the
//! directory volume provisioner of StorageClass `local-directory` (`provisioning`,
//! `provisioner`), both fed by kube-rs reflectors. They stand in for what kind gets from
//! CoreDNS and rancher's local-path-provisioner.

pub mod dns;
pub mod dns_server;
pub mod provisioner;
pub mod provisioning;

use std::fmt::Debug;
use std::hash::Hash;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Config, Resource};
use serde::de::DeserializeOwned;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;

/// Flags of `process-kubelet cluster-services`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServicesArgs {
    /// Kubeconfig of the services' own identity (cluster-up's cluster-services.kubeconfig).
    #[arg(long)]
    pub kubeconfig: PathBuf,
    /// Address for DNS over UDP and TCP (the pods' nameserver).
    #[arg(long, default_value = "10.244.0.1:53")]
    pub dns_listen: SocketAddr,
    /// The cluster domain served.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Absolute directory under which each provisioned volume gets `<pv-name>/`.
    #[arg(long)]
    pub volumes_dir: PathBuf,
    /// The provisioner name that StorageClasses name to get these volumes.
    #[arg(long, default_value = "consensus.dev/local-directory")]
    pub provisioner_name: String,
}

/// Serves DNS and provisions volumes until SIGTERM or SIGINT.
pub async fn run(args: ServicesArgs) -> anyhow::Result<()> {
    // The PV records this path and the kubelet mounts it from any working directory.
    anyhow::ensure!(
        args.volumes_dir.is_absolute(),
        "--volumes-dir must be absolute: {}",
        args.volumes_dir.display()
    );
    std::fs::create_dir_all(&args.volumes_dir)
        .with_context(|| format!("creating {}", args.volumes_dir.display()))?;
    let zone = Arc::new(dns::Zone::new(&args.cluster_domain).context("--cluster-domain")?);
    // Bound before anything else, so that a taken port fails the start at once.
    let dns_server = dns_server::DnsServer::bind(args.dns_listen).await?;
    let client = client(&args).await?;
    let settings = provisioning::Settings {
        provisioner: args.provisioner_name.clone(),
        volumes_dir: args.volumes_dir.clone(),
    };

    let (services, services_writer) = reflector::store::<Service>();
    let (slices, slices_writer) = reflector::store::<EndpointSlice>();
    let source: dns_server::SnapshotSource = {
        let (services, slices) = (services.clone(), slices.clone());
        Arc::new(move || dns::Snapshot {
            // A store is ready once it has listed; before that, see `Snapshot::ready`.
            ready: matches!(services.wait_until_ready().now_or_never(), Some(Ok(())))
                && matches!(slices.wait_until_ready().now_or_never(), Some(Ok(()))),
            services: services.state(),
            endpoint_slices: slices.state(),
        })
    };

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        result = dns_server.serve(zone, source) => result.context("cluster DNS")?,
        result = provisioner::run(client.clone(), settings) => result.context("volume provisioner")?,
        () = reflect(Api::<Service>::all(client.clone()), services_writer, None) => {}
        () = reflect(Api::<EndpointSlice>::all(client.clone()), slices_writer, None) => {}
        _ = terminate.recv() => tracing::info!("SIGTERM: stopping"),
        _ = interrupt.recv() => tracing::info!("SIGINT: stopping"),
    }
    Ok(())
}

async fn client(args: &ServicesArgs) -> anyhow::Result<Client> {
    let kubeconfig = Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("reading {}", args.kubeconfig.display()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// Keeps `writer`'s store in step with the API (re-listing with back-off after errors) and
/// wakes `changed`, if given, after every event. Never returns.
pub(crate) async fn reflect<K>(api: Api<K>, writer: Writer<K>, changed: Option<Arc<Notify>>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let stream = watcher(api, watcher::Config::default()).default_backoff().reflect(writer);
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(_) => {
                if let Some(changed) = &changed {
                    changed.notify_one();
                }
            }
            Err(error) => tracing::warn!(%kind, %error, "watch failed; retrying"),
        }
    }
    // default_backoff() retries forever, so the stream does not end; if it ever did, the
    // store would silently go stale, so stay here rather than return.
    tracing::error!(%kind, "watch stream ended");
    std::future::pending::<()>().await
}
