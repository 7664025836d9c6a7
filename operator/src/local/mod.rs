//! The embedded platform: one ConsensusCluster from a file, its members as `consensus-node`
//! processes on loopback, driven by the same planner as on Kubernetes through the same
//! boundary (`platform`): observe (every member on its own port, by the shared observer),
//! plan, act, write the status; every second and whenever the file changes.

mod act;
mod atomic;
mod backups;
mod error;
mod process;
mod recovery;
pub mod request;
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

use crate::fault;
use crate::membership::{EtcdMembers, Members, Target, observe};
use crate::plan::backup::{backup_name, last_scheduled, outcome_event, removable, request_updates};
use crate::plan::recovery::{quorum_event, quorum_lost_since, recovery_event, recovery_in};
use crate::plan::{self, Observed, Step};
use crate::platform::{self, Platform, Round};
use crate::resources::backup::BackupJob;

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
    /// The file's `consensus.dev/recover` annotation.
    recovery_request: Option<String>,
}

impl Declaration {
    fn update(&mut self, declared: Declared) {
        let (spec, refused) = match declared {
            Declared::Cluster { name, spec, recover } if name == self.name => {
                self.recovery_request = recover;
                (*spec, None)
            }
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
    let (name, spec, recovery_request) = match file.changed()? {
        Some(Declared::Cluster { name, spec, recover }) => (name, *spec, recover),
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
    let backups = backups::Backups::new(&state_dir, &name, &node_bin);
    let recovery = recovery::Recovery::new(&state_dir, &name, &node_bin);
    let status_path = status_file::path(&state_dir, &name);
    let events = act::Events::new(&state_dir, &name);
    tracing::info!(cluster = %name, file = %args.file.display(), status = %status_path.display(), "local mode");
    let mut operator = Operator {
        declaration: Declaration { name, spec, refused: None, generation: 1, recovery_request },
        previous: status_file::read(&status_path),
        status_path,
        workload,
        backups,
        recovery,
        members: EtcdMembers::default(),
        events,
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
    backups: backups::Backups,
    recovery: recovery::Recovery,
    members: EtcdMembers,
    events: act::Events,
    last_step: Option<Step>,
    announced: bool,
}

/// What one local round saw.
pub struct Seen {
    observed: Observed,
    /// The client URL the leader answered on, where leader-only changes go.
    leader_url: Option<String>,
}

impl AsRef<Observed> for Seen {
    fn as_ref(&self) -> &Observed {
        &self.observed
    }
}

impl Platform for Operator {
    type Observation = Seen;
    type Error = act::StepError;

    async fn observe(&mut self) -> Result<Seen, act::StepError> {
        let targets: Vec<Target> = self
            .workload
            .members()
            .iter()
            .map(|m| Target { name: m.name.clone(), client_url: m.client_url() })
            .collect();
        let answers = self.members.ask(&targets).await;
        // Reserved members too: a learner added but not started is listed by peer URL only.
        let known = self.workload.known();
        let view = observe::combine(&answers, |peer_url| {
            known.iter().find(|k| k.peer_url() == peer_url).map(|k| k.name.clone())
        });
        let volumes = self.workload.volumes();
        let now = Timestamp::now();
        let mut observed = Observed {
            generation: Some(self.declaration.generation),
            workload_replicas: self.workload.replicas(),
            // Data directories without a record of the members that made them are another
            // cluster's (or one whose record was lost): its data, not ours to start on.
            kept_volumes: if self.workload.replicas().is_none() { volumes.clone() } else { Vec::new() },
            volumes,
            lost_data: self.workload.lost_data(),
            established: self.previous.as_ref().is_some_and(|s| s.cluster_id.is_some()),
            now,
            last_scheduled_backup: last_scheduled(self.previous.as_ref()),
            backup_runs: self.backups.observe(now),
            backup_requests: self.backups.requests(),
            last_backup: self.previous.as_ref().and_then(|s| s.last_backup.clone()),
            quorum_lost_since: quorum_lost_since(self.previous.as_ref()),
            recovery: recovery_in(self.previous.as_ref()),
            recovery_request: self.declaration.recovery_request.clone(),
            status_cluster_id: self.previous.as_ref().and_then(|s| s.cluster_id.clone()),
            backup_destination: (self.declaration.spec.backup.as_ref())
                .map(|b| self.backups.destination_url(&b.destination, &self.declaration.name)),
            ..Observed::default()
        };
        platform::fill(&mut observed, &view);
        // Every member runs the consensus-node binary this operator was started with: there
        // is no template for a member to fall behind.
        for member in observed.members.iter_mut().flatten() {
            member.outdated = Some(false);
        }
        Ok(Seen { observed, leader_url: view.leader_url })
    }

    async fn act(&mut self, seen: &Seen, step: &Step) -> Result<(), act::StepError> {
        let new = self.last_step.as_ref() != Some(step);
        self.last_step = Some(step.clone());
        match step {
            Step::RefuseSpec { reason } if new => {
                tracing::warn!("refusing the spec, changing nothing: {reason}");
            }
            Step::CreateWorkload { replicas, bootstrap } => {
                tracing::info!(replicas, bootstrap, "creating the members");
                self.workload.create(&self.declaration.name, *replicas, *bootstrap)?;
            }
            Step::Wait { reason } if new => tracing::info!("waiting: {reason}"),
            Step::TakeBackup { slot, attempt, from, request } => {
                let member = self.workload.members().iter().find(|m| &m.name == from);
                let endpoint = member.ok_or_else(|| act::StepError::NoSuchMember(from.clone()))?.client_url();
                let cluster = &self.declaration.name;
                let backup = backup_name(cluster, *slot, request.as_deref());
                let observed = &seen.observed;
                let asked =
                    request.as_ref().and_then(|r| observed.backup_requests.iter().find(|q| &q.name == r));
                let run = BackupJob::planned(&self.declaration.spec, &backup, (*slot, *attempt, from), asked)
                    .ok_or(act::StepError::NoBackupDestination)?;
                let ended: Vec<(String, u32)> = observed
                    .backup_runs
                    .iter()
                    .filter(|r| removable(r, &observed.backup_requests))
                    .map(|r| (r.backup.clone(), r.attempt))
                    .collect();
                self.backups.start(cluster, &run, &endpoint, observed.now, &ended)?;
                let asked_by = request.as_ref().map_or_else(String::new, |r| format!(" request={r}"));
                self.events
                    .emit("BackupStarted", &format!("{backup} attempt={attempt} from={from}{asked_by}"));
            }
            Step::BeginRecovery { record } => {
                tracing::warn!(from = %record.from, source = ?record.source, "recovering from quorum loss");
                fault::reached(step.name());
            }
            Step::Recover { record } => {
                self.recovery.recover(&mut self.workload, record, &self.declaration.spec).await?;
            }
            Step::Steady if new => tracing::info!("steady: the cluster is in its declared shape"),
            // Never planned locally: every member runs this operator's consensus-node.
            Step::RefuseSpec { .. } | Step::Wait { .. } | Step::Steady | Step::UpdateMember { .. } => {}
            Step::AddLearner { .. }
            | Step::ResizeWorkload { .. }
            | Step::ChangeVoters { .. }
            | Step::TransferLeadership { .. }
            | Step::RemoveMember { .. }
            | Step::DeleteVolume { .. } => {
                act::membership_step(
                    &mut self.workload,
                    &mut self.events,
                    &self.members,
                    &self.declaration.name,
                    step,
                    seen,
                )
                .await?;
                fault::reached(step.name());
            }
        }
        Ok(())
    }
}

impl Operator {
    /// One observe-plan-act round; its problems are logged and retried next round. True
    /// when it carried out a step that changes the cluster or a change is under way.
    async fn reconcile(&mut self) -> bool {
        // Keeping member processes alive is the platform's job, as the kubelet's is for pods;
        // but not while a recovery is making them again: a member started on a half-made
        // data directory would answer as what it is not.
        let recovering = self.previous.as_ref().and_then(|s| s.recovery.as_ref());
        let remaking =
            recovering.is_some_and(|r| self.workload.cluster_token() != Some(r.cluster_token.as_str()));
        if !remaking && let Err(err) = self.workload.supervise() {
            tracing::warn!("{err}");
        }
        let (spec, refused) = (self.declaration.spec.clone(), self.declaration.refused.clone());
        let decide = |observed: &Observed| match refused {
            Some(reason) => Step::RefuseSpec { reason },
            None => plan::plan(&spec, observed),
        };
        let Round { observation, step, acted } = match platform::round(self, decide).await {
            Ok(round) => round,
            Err(err) => {
                tracing::warn!("observing the members: {err}; retrying on the next reconcile");
                return false;
            }
        };
        let failure = acted.as_ref().err().map(ToString::to_string);
        let changed = match &acted {
            // Creating starts members that take a while to answer: no reason to look sooner.
            Ok(()) => step.changes_cluster() && !matches!(step, Step::CreateWorkload { .. }),
            Err(err) => {
                tracing::warn!(step = step.name(), "{err}; retrying on the next reconcile");
                false
            }
        };
        let status = plan::status(
            &self.declaration.spec,
            &observation.observed,
            &step,
            failure.as_deref(),
            self.previous.as_ref(),
            Time(observation.observed.now),
        );
        if let Some(event) = outcome_event(self.previous.as_ref(), &status) {
            self.events.emit(event.reason, &event.message);
        }
        let quorum = quorum_event(self.previous.as_ref(), &status);
        for event in quorum.into_iter().chain(recovery_event(self.previous.as_ref(), &status)) {
            self.events.emit(event.reason, &event.message);
        }
        let observed = &observation.observed;
        for update in request_updates(&self.declaration.spec, observed, &step, failure.as_deref()) {
            if let Err(err) = self.backups.write_request_status(&update.request.name, &update.status) {
                tracing::warn!("{err}");
            }
            if let Some(event) = update.event {
                self.events
                    .emit(event.reason, &format!("request {}: {}", update.request.name, event.message));
            }
        }
        if let Err(err) = status_file::write(&self.status_path, &status) {
            tracing::warn!("{err}");
        }
        self.announce(&status);
        // While a membership change waits (learners starting, catching up), look again soon:
        // what it waits for takes milliseconds to a few seconds, not a reconcile period each.
        let scaling = status.phase == Some(consensus_crds::Phase::Scaling);
        self.previous = Some(status);
        changed || scaling
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
