//! The process kubelet's node agent (`process-kubelet node`): registers one Node, keeps its
//! Lease, runs the pods the scheduler binds to it as podman containers (runc) in their own
//! network namespaces, and serves their logs to the API server.
//!
//! Files: `node` registration, status and Lease; `sandbox` netns/veth/address, hosts and
//! resolv.conf; `podman` the container runtime; `volumes`; `env`; `probe`; `restart`
//! (policy, back-off); `status` (pod status from container states); `logs` (files and the
//! HTTPS server); `state` (the state file); `pod` (one pod's worker).
//!
//! When the kubelet exits (SIGTERM/SIGINT) its containers keep running unless
//! `--stop-pods-on-exit`. A restarted kubelet adopts what a previous run left for pods still
//! bound to it (containers labelled `consensus-dev.node=<name>`, their namespaces and
//! addresses from the state file): running containers keep running, with the same
//! restartCount. What does not fit is removed and started again (restartCount goes up); the
//! containers and namespaces of pods that are gone are removed after the first pod listing.
//! `hack/cluster-down.sh` removes containers by label.

pub mod env;
pub mod logs;
pub mod node;
pub mod pod;
pub mod podman;
pub mod probe;
pub mod restart;
pub mod sandbox;
pub mod state;
pub mod status;
pub mod volumes;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch;

#[derive(clap::Args, Debug, Clone)]
pub struct NodeArgs {
    /// Node name (also the hostname label and the Lease name).
    #[arg(long)]
    pub name: String,
    /// topology.kubernetes.io/zone of the node.
    #[arg(long)]
    pub zone: String,
    /// i (1-based): pod CIDR 10.244.i.0/24, kubelet port 10250+i.
    #[arg(long)]
    pub node_number: u8,
    /// Kubeconfig with the node's identity (CN=system:node:<name>, O=system:nodes).
    #[arg(long)]
    pub kubeconfig: PathBuf,
    /// Address of the logs server; default <gateway>:(10250+node-number).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    #[arg(long)]
    pub tls_cert: PathBuf,
    #[arg(long)]
    pub tls_key: PathBuf,
    /// CA that signs the API server's kubelet client certificate.
    #[arg(long)]
    pub client_ca: PathBuf,
    /// Host bridge the pods' veths join.
    #[arg(long, default_value = "ccbr0")]
    pub bridge: String,
    /// The bridge's address: the node's InternalIP and the pods' hostIP.
    #[arg(long, default_value = "10.244.0.1")]
    pub gateway: String,
    /// Nameserver for ClusterFirst pods.
    #[arg(long, default_value = "10.244.0.1")]
    pub cluster_dns: String,
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// KUBERNETES_SERVICE_HOST given to pods.
    #[arg(long, default_value = "10.244.0.1")]
    pub api_server_host: String,
    #[arg(long, default_value_t = 6443)]
    pub api_server_port: u16,
    /// Cluster state directory; this node keeps its own under nodes/<name>/.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// Pods this node accepts (Node capacity).
    #[arg(long, default_value_t = 110)]
    pub max_pods: u32,
    /// Remove this node's containers and namespaces when the kubelet exits (default: leave
    /// them running, as a real kubelet does).
    #[arg(long, default_value_t = false)]
    pub stop_pods_on_exit: bool,
}

/// What every pod worker shares.
pub struct Kubelet {
    pub client: Client,
    pub args: NodeArgs,
    pub node_dir: PathBuf,
    pub node_number: u8,
    pub store: state::Store,
    pub logs: Arc<logs::Index>,
    pub nofile: u64,
    pub nproc: u64,
}

pub async fn run(args: NodeArgs) -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    if args.node_number == 0 || args.node_number > 254 {
        bail!("--node-number must be 1..=254");
    }
    let node_dir = args.state_dir.join("nodes").join(&args.name);
    std::fs::create_dir_all(&node_dir)?;
    let store = state::Store::open(&node_dir)?;

    let kubeconfig = Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("reading {}", args.kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    let client = Client::try_from(config)?;
    let version = client.apiserver_version().await.context("asking the API server for its version")?;

    // What a previous run left is adopted by the pods' workers, or removed once the first
    // pod listing shows whose pods are gone (`forget_gone`).

    let tls = logs::tls_config(&args.tls_cert, &args.tls_key, &args.client_ca)?;
    let listen = match args.listen {
        Some(a) => a,
        None => format!("{}:{}", args.gateway, 10250 + args.node_number as u16)
            .parse()
            .context("--gateway must be an IP address")?,
    };
    let index = Arc::new(logs::Index::default());
    let server = tokio::spawn(logs::serve(listen, tls, index.clone()));

    let (cpus, memory, disk) = node::machine(&args.state_dir);
    let facts = node::Facts {
        name: args.name.clone(),
        zone: args.zone.clone(),
        pod_cidr: format!("10.244.{}.0/24", args.node_number),
        internal_ip: args.gateway.clone(),
        port: listen.port(),
        kubelet_version: version.git_version.clone(),
        runtime_version: podman::runtime_version().await,
        cpus,
        memory_bytes: memory,
        max_pods: args.max_pods,
        ephemeral_bytes: disk,
    };
    let registered = node::register(&client, &facts).await?;
    node::renew_lease(&client, &registered).await.context("creating the node lease")?;
    tracing::info!(node = %args.name, zone = %args.zone, version = %version.git_version, %listen, "node registered");
    let heartbeat = tokio::spawn(node::heartbeat(client.clone(), facts, registered));

    let kubelet = Arc::new(Kubelet {
        client: client.clone(),
        node_dir,
        node_number: args.node_number,
        store,
        logs: index,
        nofile: podman::ulimit(libc::RLIMIT_NOFILE, 1 << 20),
        nproc: podman::ulimit(libc::RLIMIT_NPROC, 32768),
        args: args.clone(),
    });

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let result = tokio::select! {
        r = manage(kubelet.clone()) => r,
        r = server => r.context("logs server")?.context("logs server"),
        _ = term.recv() => Ok(()),
        _ = tokio::signal::ctrl_c() => Ok(()),
    };
    heartbeat.abort();
    if args.stop_pods_on_exit {
        tracing::info!("stopping this node's pods (--stop-pods-on-exit)");
        remove_leftovers(&args.name, &kubelet.store).await;
    } else {
        tracing::info!("kubelet exiting; its containers keep running");
    }
    result
}

/// Removes containers labelled with this node and the namespaces of the pods in the state
/// file (--stop-pods-on-exit); their addresses stay reserved for the same pods.
async fn remove_leftovers(node: &str, store: &state::Store) {
    match podman::remove_labelled(podman::NODE_LABEL, node).await {
        Ok(0) => {}
        Ok(count) => tracing::info!(count, "removed containers a previous run left"),
        Err(e) => tracing::warn!(error = %format!("{e:#}"), "removing leftover containers"),
    }
    for uid in store.snapshot().addresses.keys() {
        sandbox::destroy(uid).await;
    }
}

/// Addresses and directories of pods that no longer exist (deleted while the kubelet was
/// down): their containers and namespaces went with the leftovers at start.
async fn forget_gone(k: &Kubelet, seen: &HashSet<String>) {
    match podman::list_node(&k.args.name).await {
        Ok(list) => {
            for (id, uid) in list {
                if !seen.contains(&uid) {
                    tracing::info!(%id, %uid, "removing a container of a pod that is gone");
                    let _ = podman::remove(&id).await;
                }
            }
        }
        Err(e) => tracing::warn!(error = %format!("{e:#}"), "listing this node's containers"),
    }
    let gone: Vec<String> =
        k.store.snapshot().addresses.keys().filter(|u| !seen.contains(*u)).cloned().collect();
    for uid in &gone {
        sandbox::destroy(uid).await;
    }
    if let Err(e) = k.store.update(|s| s.addresses.retain(|uid, _| seen.contains(uid))) {
        tracing::warn!(error = %format!("{e:#}"), "releasing addresses of gone pods");
    }
    let pods = k.node_dir.join("pods");
    for entry in std::fs::read_dir(&pods).into_iter().flatten().flatten() {
        let uid = entry.file_name().to_string_lossy().into_owned();
        if !seen.contains(&uid) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    for entry in std::fs::read_dir(k.node_dir.join("logs")).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // <ns>_<pod>_<uid>: a uid has no underscore.
        if name.rsplit('_').next().is_some_and(|uid| !seen.contains(uid)) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

enum Slot {
    Running(watch::Sender<Option<Pod>>),
    Done,
}

/// Watches the pods bound to this node and keeps one worker per pod uid.
async fn manage(k: Arc<Kubelet>) -> Result<()> {
    let api: Api<Pod> = Api::all(k.client.clone());
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", k.args.name));
    // Back off between failed watch attempts (an API server restart must not spin this loop).
    let mut stream = watcher(api, cfg).default_backoff().boxed();
    let mut slots: HashMap<String, Slot> = HashMap::new();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut listing: Option<HashSet<String>> = None;
    loop {
        let event = tokio::select! {
            e = stream.next() => e,
            Some(uid) = done_rx.recv() => {
                slots.insert(uid, Slot::Done);
                continue;
            }
        };
        let Some(event) = event else { bail!("pod watch ended") };
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "pod watch");
                continue;
            }
        };
        match event {
            watcher::Event::Init => listing = Some(HashSet::new()),
            watcher::Event::InitApply(pod) => {
                if let Some(l) = listing.as_mut() {
                    l.insert(pod.metadata.uid.clone().unwrap_or_default());
                }
                apply(&k, &mut slots, &done_tx, pod);
            }
            watcher::Event::InitDone => {
                // Pods that went away while the watch was down.
                let seen = listing.take().unwrap_or_default();
                forget_gone(&k, &seen).await;
                for (uid, slot) in slots.iter() {
                    if let Slot::Running(tx) = slot
                        && !seen.contains(uid)
                    {
                        let _ = tx.send(None);
                    }
                }
            }
            watcher::Event::Apply(pod) => apply(&k, &mut slots, &done_tx, pod),
            watcher::Event::Delete(pod) => {
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                if let Some(Slot::Running(tx)) = slots.get(&uid) {
                    let _ = tx.send(None);
                }
            }
        }
        // Forget finished pods the API no longer has (bounded memory over a long run).
        if slots.len() > 1000 {
            slots.retain(|_, s| matches!(s, Slot::Running(_)));
        }
    }
}

fn apply(
    k: &Arc<Kubelet>,
    slots: &mut HashMap<String, Slot>,
    done: &tokio::sync::mpsc::UnboundedSender<String>,
    pod: Pod,
) {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    match slots.get(&uid) {
        Some(Slot::Running(tx)) => {
            let _ = tx.send(Some(pod));
        }
        Some(Slot::Done) => {}
        None => {
            tracing::info!(pod = ?pod.metadata.name, ns = ?pod.metadata.namespace, %uid, "pod bound to this node");
            let (tx, rx) = watch::channel(Some(pod));
            let k = k.clone();
            let done = done.clone();
            let u = uid.clone();
            tokio::spawn(async move {
                pod::run(k, rx).await;
                let _ = done.send(u);
            });
            slots.insert(uid, Slot::Running(tx));
        }
    }
}
