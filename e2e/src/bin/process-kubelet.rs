//! The process kubelet of the local Kubernetes platform (`make cluster-up`): `node` registers
//! one zone-labelled Node and runs the pods bound to it as containers in their own network
//! namespaces; `cluster-services` serves cluster DNS and provisions directory volumes.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "process-kubelet", about = "Nodes and cluster services of the local Kubernetes platform")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One node: registration, its Lease, and the pods bound to it.
    Node(consensus_e2e::kubelet::NodeArgs),
    /// Cluster DNS and the directory volume provisioner, once per cluster.
    ClusterServices(consensus_e2e::cluster_services::ServicesArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(false)
        .init();
    match Cli::parse().command {
        Command::Node(args) => consensus_e2e::kubelet::run(args).await,
        Command::ClusterServices(args) => consensus_e2e::cluster_services::run(args).await,
    }
}
