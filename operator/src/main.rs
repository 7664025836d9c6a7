//! `consensus-operator`: keeps ConsensusClusters in their declared shape.

use std::io::IsTerminal;

use anyhow::Context;
use clap::{Parser, Subcommand};
use consensus_operator::{local, signal};

#[derive(Parser)]
#[command(version, about = "Keeps ConsensusClusters in their declared shape")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one ConsensusCluster from a file as member processes on this machine.
    Local(local::LocalArgs),
    /// Reconcile ConsensusClusters on the Kubernetes cluster in reach (in cluster, or KUBECONFIG).
    Run(consensus_operator::k8s::RunArgs),
    /// Take a backup now of a cluster `local` runs, and wait for it (on Kubernetes, create
    /// a ConsensusBackup).
    Backup(local::request::BackupArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let shutdown = signal::shutdown().context("installing signal handlers")?;
    match Cli::parse().command {
        Command::Local(args) => local::run(args, shutdown).await.context("local mode")?,
        Command::Run(args) => consensus_operator::k8s::run(args, shutdown).await?,
        Command::Backup(args) => {
            let status = tokio::select! {
                status = local::request::run(args) => status.context("backup")?,
                () = shutdown => anyhow::bail!("interrupted; the request stays queued"),
            };
            if let Some(backup) = status.backup {
                let verified = if backup.verified == Some(true) { ", verified" } else { "" };
                println!(
                    "{} revision {} ({} bytes, sha256 {}{verified}) at {}",
                    backup.name, backup.revision, backup.size_bytes, backup.sha256, backup.location
                );
            }
        }
    }
    Ok(())
}
