//! The embedded platform: one ConsensusCluster from a file, its members as `consensus-node`
//! processes on loopback, driven by the same planner as on Kubernetes. Observe (Status and
//! MemberList on every member), plan, act, write the status; every second and whenever the
//! file changes.

mod act;
mod atomic;
mod error;
mod observe;
mod process;
mod spec_file;
mod status_file;
mod workload;

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use consensus_crds::{ConsensusClusterSpec, ConsensusClusterStatus, condition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use tokio::time::Instant;

pub use error::LocalError;
use spec_file::{Declared, SpecFile};
use workload::Workload;

use crate::plan::{self, Step};

const RECONCILE_EVERY: Duration = Duration::from_secs(1);
/// After a step that changed the membership, the next one is looked for this soon: the
/// change shows in the members' answers within milliseconds, and a scale of several steps
/// should not take a second per step.
const RECONCILE_AFTER_CHANGE: Duration = Duration::from_millis(100);
/// How often FILE is read for changes; an edit is acted on within this.
const FILE_POLL: Duration = Duration::from_millis(200);

#[derive(clap::Args, Debug)]
pub struct LocalArgs {
    /// The ConsensusCluster YAML to run (edits are picked up while running).
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Where member data, logs and `<name>.status.yaml` go.
    #[arg(long, default_value = ".state/local")]
    pub state_dir: PathBuf,
    /// The consensus-node binary; by default the one next to this binary.
    #[arg(long, env = "CONSENSUS_NODE_BIN")]
    pub node_bin: Option<PathBuf>,
}

fn node_binary(explicit: Option<&Path>) -> Result<PathBuf, LocalError> {
    let path = match explicit {
        Some(path) => path.to_owned(),
        None => {
            let exe = std::env::current_exe().map_err(LocalError::CurrentExe)?;
            exe.with_file_name("consensus-node")
        }
    };
    if path.is_file() { Ok(path) } else { Err(LocalError::NodeBinary { path }) }
}

/// What the file declares now, for the planner.
struct Declaration {
    name: String,
    spec: ConsensusClusterSpec,
    /// Why the file's current content is refused, when it is; `spec` is then the last good one.
    refused: Option<String>,
    /// Counts changes of the file since start, as `metadata.generation` counts spec changes.
    generation: i64,
}

impl Declaration {
    fn update(&mut self, declared: Declared) {
        let (spec, refused) = match declared {
            Declared::Cluster { name, spec } if name == self.name => (*spec, None),
            Declared::Cluster { name, .. } => (
                self.spec.clone(),
                Some(format!(
                    "metadata.name changed from {:?} to {name:?}: one local operator runs one cluster; \
                     stop it and start another for {name:?}",
                    self.name
                )),
            ),
            Declared::Unreadable(reason) => (self.spec.clone(), Some(reason)),
        };
        // Like metadata.generation, only a change of what is declared counts, not of comments.
        if spec != self.spec || refused != self.refused {
            self.generation += 1;
        }
        self.spec = spec;
        self.refused = refused;
    }
}

/// Runs the cluster declared in `args.file` until `shutdown` resolves, then stops its members.
pub async fn run(args: LocalArgs, shutdown: impl Future<Output = ()>) -> Result<(), LocalError> {
    let node_bin = node_binary(args.node_bin.as_deref())?;
    let mut file = SpecFile::new(&args.file);
    let (name, spec) = match file.changed()? {
        Some(Declared::Cluster { name, spec }) => (name, *spec),
        Some(Declared::Unreadable(reason)) => {
            return Err(LocalError::ParseSpec { path: args.file.clone(), reason });
        }
        None => return Err(LocalError::ParseSpec { path: args.file.clone(), reason: "empty".to_owned() }),
    };
    std::fs::create_dir_all(&args.state_dir).map_err(|source| LocalError::State {
        action: "creating",
        path: args.state_dir.clone(),
        source,
    })?;
    // Absolute, so member command lines name their data directories the same way whatever
    // directory a later run starts in (adoption matches on them).
    let state_dir = args.state_dir.canonicalize().map_err(|source| LocalError::State {
        action: "resolving",
        path: args.state_dir.clone(),
        source,
    })?;
    let workload = Workload::open(&state_dir, &name, &node_bin)?;
    let status_path = status_file::path(&state_dir, &name);
    let events = act::Events::new(&state_dir, &name);
    tracing::info!(cluster = %name, file = %args.file.display(), status = %status_path.display(), "local mode");
    let mut operator = Operator {
        declaration: Declaration { name, spec, refused: None, generation: 1 },
        previous: status_file::read(&status_path),
        status_path,
        workload,
        events,
        fault_after: act::fault_after(),
        last_step: None,
        announced: false,
    };

    tokio::pin!(shutdown);
    let mut next_reconcile = Instant::now();
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep_until(next_reconcile.min(Instant::now() + FILE_POLL)) => {}
        }
        match file.changed() {
            Ok(Some(declared)) => {
                tracing::info!(file = %file.path().display(), "the file changed");
                operator.declaration.update(declared);
                next_reconcile = Instant::now();
            }
            Ok(None) => {}
            Err(err) => tracing::warn!("{err}"),
        }
        if Instant::now() >= next_reconcile {
            let changed = operator.reconcile().await;
            next_reconcile = Instant::now() + if changed { RECONCILE_AFTER_CHANGE } else { RECONCILE_EVERY };
        }
    }
    tracing::info!("stopping the members");
    operator.workload.stop().await;
    tracing::info!("stopped");
    Ok(())
}

struct Operator {
    declaration: Declaration,
    previous: Option<ConsensusClusterStatus>,
    status_path: PathBuf,
    workload: Workload,
    events: act::Events,
    /// `CONSENSUS_OPERATOR_FAULT_AFTER`: the step after which this run dies, for tests.
    fault_after: Option<String>,
    last_step: Option<Step>,
    announced: bool,
}

impl Operator {
    /// One observe-plan-act round; its problems are logged and retried next round. True
    /// when it carried out a step that changes the cluster or a change is under way.
    async fn reconcile(&mut self) -> bool {
        // Keeping member processes alive is the platform's job, as the kubelet's is for pods.
        if let Err(err) = self.workload.supervise() {
            tracing::warn!("{err}");
        }
        let answers = observe::ask_all(self.workload.members()).await;
        let mut observed = observe::combine(
            &answers,
            &self.workload.known(),
            Some(self.declaration.generation),
            self.workload.replicas(),
        );
        observed.volumes = self.workload.volumes();
        observed.lost_data = self.workload.lost_data();
        let step = match &self.declaration.refused {
            Some(reason) => Step::RefuseSpec { reason: reason.clone() },
            None => plan::plan(&self.declaration.spec, &observed),
        };
        let acted = self.act(&step, &observed).await;
        let status = plan::status(
            &self.declaration.spec,
            &observed,
            &step,
            acted.as_ref().err().map(String::as_str),
            self.previous.as_ref(),
            Time(Timestamp::now()),
        );
        if let Err(err) = status_file::write(&self.status_path, &status) {
            tracing::warn!("{err}");
        }
        self.announce(&status);
        // While a membership change waits (learners starting, catching up), look again soon:
        // what it waits for takes milliseconds to a few seconds, not a reconcile period each.
        let scaling = status.phase == Some(consensus_crds::Phase::Scaling);
        self.previous = Some(status);
        acted.unwrap_or(false) || scaling
    }

    /// Carries out `step`; true when it changed the cluster, the failure when it failed.
    async fn act(&mut self, step: &Step, observed: &plan::Observed) -> Result<bool, String> {
        let new = self.last_step.as_ref() != Some(step);
        if step.changes_cluster() && !matches!(step, Step::CreateWorkload { .. }) {
            self.last_step = Some(step.clone());
            let done = act::membership_step(
                &mut self.workload,
                &mut self.events,
                &self.declaration.name,
                step,
                observed,
            )
            .await;
            match done {
                Ok(()) => {
                    if self.fault_after.as_deref() == Some(step.name()) {
                        act::die_after(step);
                    }
                    return Ok(true);
                }
                Err(err) => {
                    tracing::warn!(step = step.name(), "{err}; retrying on the next reconcile");
                    return Err(err.to_string());
                }
            }
        }
        match step {
            Step::RefuseSpec { reason } if new => {
                tracing::warn!("refusing the spec, changing nothing: {reason}");
            }
            Step::CreateWorkload { replicas } => {
                tracing::info!(replicas, "creating the members");
                self.last_step = Some(step.clone());
                if let Err(err) = self.workload.create(&self.declaration.name, *replicas) {
                    tracing::error!("creating the members: {err}");
                    return Err(format!("creating the members: {err}"));
                }
            }
            Step::Wait { reason } if new => tracing::info!("waiting: {reason}"),
            Step::Steady if new => tracing::info!("steady: the cluster is in its declared shape"),
            _ => {}
        }
        self.last_step = Some(step.clone());
        Ok(false)
    }

    /// Once the cluster first serves, the endpoints and a command to try them.
    fn announce(&mut self, status: &ConsensusClusterStatus) {
        let available =
            status.conditions.iter().any(|c| c.type_ == condition::AVAILABLE && c.status == "True");
        if self.announced || !available {
            return;
        }
        self.announced = true;
        let endpoints: Vec<String> = self.workload.members().iter().map(|m| m.client_url()).collect();
        let endpoints = endpoints.join(",");
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "cluster {} is available, leader {}\nendpoints: {endpoints}\ntry: ETCDCTL_API=3 etcdctl \
             --endpoints={endpoints} endpoint status -w table\nstatus: {}\npids: {}\nCtrl-C stops the cluster.",
            self.declaration.name,
            status.leader.as_deref().unwrap_or("unknown"),
            self.status_path.display(),
            self.workload.pids().iter().map(|(n, p)| format!("{n}={p}")).collect::<Vec<_>>().join(","),
        );
        let _ = out.flush();
    }
}
