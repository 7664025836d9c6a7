//! `consensus-operator`: one subcommand per platform, each in its own module.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "Keeps ConsensusClusters in their declared shape")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reconcile ConsensusClusters on the Kubernetes cluster in reach (in cluster, or KUBECONFIG).
    Run(consensus_operator::k8s::RunArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match Cli::parse().command {
        Command::Run(args) => consensus_operator::k8s::run(args).await,
    }
}
