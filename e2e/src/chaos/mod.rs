//! The chaos harness (`make chaos`): a cluster of real `consensus-node` processes under a
//! recorded client load while a seeded plan injects faults, then every history checked:
//! linearizability by `e2e/chaos-checker` (porcupine), and here no acknowledged write lost,
//! the watch's guarantees and the locks' fencing tokens.

pub mod history;
pub mod load;
pub mod members;
pub mod plan;
pub mod proxy;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use consensus_node::proto::etcdserverpb as proto;
use proto::cluster_client::ClusterClient;

use history::Op;
use members::Cluster;
use plan::{Fault, FaultClass, Rng, Target};

pub struct RunConfig {
    pub node: PathBuf,
    pub checker: PathBuf,
    pub seed: u64,
    pub classes: Vec<FaultClass>,
    pub size: usize,
    /// How long the load runs (faults included); settling and checking come on top.
    pub length: Duration,
    /// Where the run keeps its members' data, logs and history.
    pub dir: PathBuf,
    /// Failpoints every member starts with (the checker's own test plants a bug with one).
    pub failpoints: Vec<String>,
}

#[derive(Debug, Default)]
pub struct RunReport {
    pub faults: Vec<(FaultClass, Target)>,
    pub operations: usize,
    pub linearizability: Vec<String>,
    pub lost_writes: Vec<String>,
    pub watch: Vec<String>,
    pub locks: Vec<String>,
    /// Members whose stores differ at the same revision (HashKV).
    pub divergence: Vec<String>,
    /// Member processes that ended by themselves, but for a failing disk.
    pub crashes: Vec<String>,
}

impl RunReport {
    pub fn violations(&self) -> usize {
        self.linearizability.len()
            + self.lost_writes.len()
            + self.watch.len()
            + self.locks.len()
            + self.divergence.len()
            + self.crashes.len()
    }
}

const TOKEN: &str = "chaos";

async fn status_of(endpoint: &str) -> Option<(u64, u64)> {
    let mut c = load::connect(endpoint).await?;
    let status = tokio::time::timeout(Duration::from_secs(1), c.status()).await.ok()?.ok()?;
    Some((status.header()?.member_id(), status.leader()))
}

/// The index of the member every running member agrees leads, if they do.
async fn leader(cluster: &Cluster) -> Option<usize> {
    let mut ids = HashMap::new();
    let mut leaders = Vec::new();
    for (i, m) in cluster.members.iter().enumerate().filter(|(_, m)| m.is_running()) {
        let (id, leader) = status_of(&m.endpoint()).await?;
        ids.insert(id, i);
        leaders.push(leader);
    }
    let first = *leaders.first()?;
    (first != 0 && leaders.iter().all(|l| *l == first)).then(|| ids.get(&first).copied())?
}

async fn wait_for_leader(cluster: &Cluster, deadline: Duration) -> anyhow::Result<usize> {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(l) = leader(cluster).await {
            return Ok(l);
        }
        if tokio::time::Instant::now() > until {
            bail!("no leader all members agree on within {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The member a fault hits: the leader, or a follower chosen by `rng`.
async fn target_member(cluster: &Cluster, target: Target, rng: &mut Rng) -> usize {
    let size = cluster.members.len();
    let leader = leader(cluster).await;
    match (target, leader) {
        (Target::Leader, Some(l)) => l,
        (_, Some(l)) => (l + 1 + rng.below(size as u64 - 1) as usize) % size,
        (_, None) => rng.below(size as u64) as usize,
    }
}

/// Retries `attempt` on the running members in turn until it succeeds or the settle
/// deadline passes: a membership request meets leader changes and restarts like any other.
/// The attempt gets a client of the member and its endpoint.
async fn on_any_member<T, F>(
    cluster: &Cluster,
    what: &str,
    mut attempt: impl FnMut(etcd_client::Client, String) -> F,
) -> anyhow::Result<T>
where
    F: std::future::Future<Output = anyhow::Result<T>>,
{
    let until = tokio::time::Instant::now() + members::SETTLE_DEADLINE;
    let mut last = String::new();
    loop {
        for m in cluster.members.iter().filter(|m| m.is_running()) {
            if let Some(client) = load::connect(&m.endpoint()).await {
                match attempt(client, m.endpoint()).await {
                    Ok(answer) => return Ok(answer),
                    Err(e) => last = format!("{e:#}"),
                }
            }
        }
        if tokio::time::Instant::now() > until {
            bail!("{what}: not done within {:?}: {last}", members::SETTLE_DEADLINE);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The membership the cluster has agreed on, read linearizably (etcd's MemberList
/// `linearizable`, which etcd-client cannot ask for). A member that is behind lists members
/// removed long ago: seed 13 of `membership` took a removed id at member 0's peer URL for
/// its own, removed nothing, and deleted the data of the voter that had replaced it.
async fn agreed_members(endpoint: String) -> anyhow::Result<Vec<proto::Member>> {
    let ask = async {
        let mut client = ClusterClient::connect(endpoint).await?;
        let request = proto::MemberListRequest { linearizable: true };
        anyhow::Ok(client.member_list(request).await?.into_inner().members)
    };
    tokio::time::timeout(Duration::from_secs(5), ask).await.context("member list: no answer within 5 s")?
}

/// The member at `url` in `members`: its id, and whether it is a learner.
fn at_url(members: &[proto::Member], url: &str) -> Option<(u64, bool)> {
    members.iter().find(|m| m.peer_ur_ls.iter().any(|u| u == url)).map(|m| (m.id, m.is_learner))
}

/// Removes member `i`, deletes its data and adds it back as a learner at the same peer URL,
/// then promotes it once it has caught up. Each request looks at the agreed membership
/// first, so one retried after an answer was lost does not fail on its own earlier success.
async fn remove_and_add_back(cluster: &mut Cluster, i: usize, failpoints: &[&str]) -> anyhow::Result<()> {
    let url = cluster.members[i].advertised_peer_url();
    let (id, _) = {
        let members = on_any_member(cluster, "member list", |_, endpoint| agreed_members(endpoint)).await?;
        at_url(&members, &url).context("the member is in the member list")?
    };
    // Removed while it runs, as a platform would, then stopped: killed first, it would still
    // count as a voter while the removal is agreed on.
    on_any_member(cluster, "member remove", |mut c, endpoint| async move {
        if agreed_members(endpoint).await?.iter().any(|m| m.id == id) {
            c.member_remove(id).await?;
        }
        Ok(())
    })
    .await?;
    cluster.note(&format!("m{i} ({id:x}) removed"));
    cluster.kill(i);
    cluster.rejoin_empty(i)?;
    let new_id = on_any_member(cluster, "member add", |mut c, endpoint| {
        let url = url.clone();
        async move {
            if let Some((id, _)) = at_url(&agreed_members(endpoint).await?, &url) {
                return Ok(id);
            }
            let added =
                c.member_add([url], Some(etcd_client::MemberAddOptions::new().with_is_learner())).await?;
            Ok(added.member().map_or(0, |m| m.id()))
        }
    })
    .await?;
    cluster.note(&format!("m{i} added back as learner {new_id:x}"));
    cluster.spawn(i, failpoints, TOKEN)?;
    on_any_member(cluster, "member promote", |mut c, endpoint| async move {
        if agreed_members(endpoint).await?.iter().any(|m| m.id == new_id && m.is_learner) {
            c.member_promote(new_id).await?;
        }
        Ok(())
    })
    .await?;
    cluster.note(&format!("m{i} ({new_id:x}) promoted"));
    // The member list shows the voters being changed to; the member itself says when the
    // change has reached it. Until then the cluster has two voters of the old configuration,
    // and the next fault would take its quorum away for good.
    let endpoint = cluster.members[i].endpoint();
    let until = tokio::time::Instant::now() + members::SETTLE_DEADLINE;
    loop {
        let voter = match load::connect(&endpoint).await {
            Some(mut c) => c.status().await.is_ok_and(|s| !s.is_learner() && s.leader() != 0),
            None => false,
        };
        if voter {
            return Ok(());
        }
        if tokio::time::Instant::now() > until {
            bail!("member {i} not a voter within {:?} of its promotion", members::SETTLE_DEADLINE);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Carries out `fault` on member `i`, holds it, and heals it.
async fn inject(
    cluster: &mut Cluster,
    fault: &Fault,
    i: usize,
    rng: &mut Rng,
    failpoints: &[&str],
) -> anyhow::Result<()> {
    match fault.class {
        FaultClass::Kill => {
            cluster.kill(i);
            tokio::time::sleep(fault.hold).await;
            cluster.spawn(i, failpoints, TOKEN)?;
        }
        FaultClass::Pause => {
            cluster.pause(i);
            tokio::time::sleep(fault.hold).await;
            cluster.resume(i);
        }
        FaultClass::Partition => {
            let size = cluster.members.len();
            cluster.network.change(|l| l.isolate(i, size));
            tokio::time::sleep(fault.hold).await;
            cluster.network.heal();
        }
        FaultClass::Delay => {
            let delay = rng.millis(20, 200);
            cluster.network.change(|l| {
                l.delayed.insert(i, delay);
            });
            tokio::time::sleep(fault.hold).await;
            cluster.network.heal();
        }
        FaultClass::Fsync => {
            let disk = if fault.failing { "wal-fsync=error" } else { "wal-fsync=sleep(150)" };
            cluster.kill(i);
            let mut faulty: Vec<&str> = failpoints.to_vec();
            faulty.push(disk);
            cluster.spawn(i, &faulty, TOKEN)?;
            tokio::time::sleep(fault.hold).await;
            cluster.kill(i);
            cluster.spawn(i, failpoints, TOKEN)?;
        }
        FaultClass::Membership => remove_and_add_back(cluster, i, failpoints).await?,
    }
    Ok(())
}

/// Aborts the tasks of a run when it returns, also early with an error: they would otherwise
/// go on dialing members that are gone (the live watch waits for a final revision that never
/// comes), run after run.
struct AbortOnReturn(Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnReturn {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// One chaos run: start, load and faults, heal, final reads, checks.
pub async fn run(config: &RunConfig) -> anyhow::Result<RunReport> {
    std::fs::create_dir_all(&config.dir)?;
    let failpoints: Vec<&str> = config.failpoints.iter().map(String::as_str).collect();
    let mut cluster = Cluster::start(&config.node, &config.dir, config.size, TOKEN, &failpoints).await?;
    wait_for_leader(&cluster, members::SETTLE_DEADLINE).await?;
    let endpoints = cluster.endpoints();
    let recorder = load::Recorder::new();
    let mut rng = Rng::new(config.seed);

    let start_revision =
        on_any_member(&cluster, "the first revision", |mut c, _| async move { Ok(c.get("k", None).await?) })
            .await?
            .header()
            .map_or(1, |h| h.revision())
            + 1;
    let mut tasks = Vec::new();
    let clients = 2 * config.size;
    for client in 0..clients {
        let endpoint = endpoints[client % endpoints.len()].clone();
        tasks.push(tokio::spawn(load::kv_client(recorder.clone(), client, endpoint, rng.next_u64())));
    }
    tasks.push(tokio::spawn(load::lease_client(
        recorder.clone(),
        clients,
        endpoints.clone(),
        rng.next_u64(),
    )));
    for _ in 0..2 {
        tasks.push(tokio::spawn(load::lock_client(recorder.clone(), endpoints.clone(), rng.next_u64())));
    }
    // The live watch runs through the faults and on until the final revision, known once the
    // load is over.
    let delivered = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (final_revision_known, until) = tokio::sync::watch::channel(None);
    let mut live_watch = {
        let (endpoints, delivered) = (endpoints.clone(), delivered.clone());
        tokio::spawn(async move {
            load::watch_all(endpoints, start_revision, until, move |e| {
                delivered.lock().unwrap_or_else(|p| p.into_inner()).push(e)
            })
            .await
        })
    };
    let _abort_on_return =
        AbortOnReturn(tasks.iter().map(|t| t.abort_handle()).chain([live_watch.abort_handle()]).collect());

    let mut report = RunReport::default();
    let began = tokio::time::Instant::now();
    for fault in plan::plan(config.seed, &config.classes, config.length) {
        tokio::time::sleep_until(began + fault.at).await;
        let i = target_member(&cluster, fault.target, &mut rng).await;
        cluster.note(&format!("{:?} of m{i} ({:?}) for {:?}", fault.class, fault.target, fault.hold));
        inject(&mut cluster, &fault, i, &mut rng, &failpoints)
            .await
            .with_context(|| format!("{:?} of member {i}", fault.class))?;
        report.faults.push((fault.class, fault.target));
    }
    tokio::time::sleep_until(began + config.length).await;

    // Heal: members a failing disk stopped are started again on a good one.
    cluster.network.heal();
    let (accepted, unknown) = cluster.network.connections();
    cluster.note(&format!("healed; {accepted} peer connections, {unknown} from no member"));
    for i in 0..config.size {
        cluster.exited(i);
        if !cluster.members[i].is_running() {
            cluster.spawn(i, &failpoints, TOKEN)?;
        }
    }
    wait_for_leader(&cluster, members::SETTLE_DEADLINE).await?;
    recorder.stop();
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }

    // Final linearizable reads of every key, recorded like any other.
    let final_revision = final_reads(&recorder, &endpoints, clients + 1).await?;
    let mut all = Vec::new();
    let (_, up_to_final) = tokio::sync::watch::channel(Some(final_revision));
    load::watch_all(endpoints.clone(), 1, up_to_final, |e| all.push(e)).await;
    let _ = final_revision_known.send(Some(final_revision));
    if tokio::time::timeout(members::SETTLE_DEADLINE, &mut live_watch).await.is_err() {
        // What it delivered is judged all the same: whatever is missing up to the final
        // revision is reported below. (It is aborted when the run returns.)
        cluster.note("the live watch did not reach the final revision in time");
    }

    let ops = std::mem::take(&mut *recorder.ops.lock().unwrap_or_else(|p| p.into_inner()));
    report.lost_writes = history::lost_writes(&ops, &all);
    report.watch = history::watch_violations(
        &delivered.lock().unwrap_or_else(|p| p.into_inner()),
        &all,
        start_revision,
        final_revision,
    );
    report.locks = history::lock_violations(&recorder.locks.lock().unwrap_or_else(|p| p.into_inner()));
    if !report.lost_writes.is_empty() || !report.watch.is_empty() {
        report.watch.extend(what_each_member_has(&cluster, &report, final_revision).await);
    }
    report.divergence = compare_members(&cluster, final_revision).await;
    report.crashes = std::mem::take(&mut cluster.crashes);
    let ops = history::settle_unknown_writes(ops, &all);
    report.operations = ops.len();
    let path = config.dir.join("history.json");
    std::fs::write(&path, history::checker_json(&ops))?;
    report.linearizability = check_linearizability(&config.checker, &path)?;
    Ok(report)
}

/// Every member's HashKV at `revision`, once it has applied that far: members that applied
/// the same log hold the same keys, values and revisions, whatever the clients saw.
async fn compare_members(cluster: &Cluster, revision: i64) -> Vec<String> {
    let until = tokio::time::Instant::now() + members::SETTLE_DEADLINE;
    let mut hashes = Vec::new();
    for (i, m) in cluster.members.iter().enumerate().filter(|(_, m)| m.is_running()) {
        let hash = loop {
            if let Some(mut c) = load::connect(&m.endpoint()).await {
                let options = etcd_client::GetOptions::new().with_serializable().with_keys_only();
                let applied = c.get("", Some(options)).await.ok().and_then(|r| Some(r.header()?.revision()));
                if applied.is_some_and(|r| r >= revision)
                    && let Ok(answer) = c.hash_kv(revision).await
                {
                    break Some(answer.hash());
                }
            }
            if tokio::time::Instant::now() > until {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        hashes.push((i, hash));
    }
    divergence(revision, &hashes)
}

/// What members' HashKVs at `revision` say, if they do not all agree (a member that gave
/// none cannot be shown to agree).
fn divergence(revision: i64, hashes: &[(usize, Option<u32>)]) -> Vec<String> {
    let first = hashes.first().and_then(|(_, h)| *h);
    if first.is_some() && hashes.iter().all(|(_, h)| *h == first) {
        return Vec::new();
    }
    let said: Vec<String> = hashes
        .iter()
        .map(|(i, h)| h.map_or(format!("member {i}: no hash"), |h| format!("member {i}: {h:#010x}")))
        .collect();
    vec![format!("the members' stores differ at revision {revision} (HashKV): {}", said.join(", "))]
}

/// For a history that disagrees with itself: each member's own count of revisions and what
/// it holds at the first revision in question, read from it alone (serializable).
async fn what_each_member_has(cluster: &Cluster, report: &RunReport, final_revision: i64) -> Vec<String> {
    let revision = report
        .lost_writes
        .iter()
        .chain(&report.watch)
        .find_map(|v| {
            v.split("revision")
                .nth(1)?
                .split(|c: char| !c.is_ascii_digit() && c != ' ')
                .next()?
                .trim()
                .parse::<i64>()
                .ok()
        })
        .unwrap_or(final_revision);
    let mut said = Vec::new();
    for (i, m) in cluster.members.iter().enumerate() {
        let Some(mut c) = load::connect(&m.endpoint()).await else { continue };
        let options =
            etcd_client::GetOptions::new().with_prefix().with_serializable().with_revision(revision);
        let at = match c.get("", Some(options)).await {
            Ok(r) => r
                .kvs()
                .iter()
                .filter(|kv| kv.mod_revision() == revision)
                .map(|kv| {
                    format!("{}={}", String::from_utf8_lossy(kv.key()), String::from_utf8_lossy(kv.value()))
                })
                .collect::<Vec<_>>()
                .join(" "),
            Err(e) => e.to_string(),
        };
        let now = c
            .get("", Some(etcd_client::GetOptions::new().with_prefix().with_serializable().with_keys_only()))
            .await
            .ok()
            .and_then(|r| r.header().map(|h| h.revision()));
        said.push(format!("member {i}: at revision {revision}: [{at}]; its revision now {now:?}"));
    }
    said
}

async fn final_reads(
    recorder: &Arc<load::Recorder>,
    endpoints: &[String],
    client: usize,
) -> anyhow::Result<i64> {
    let until = tokio::time::Instant::now() + members::SETTLE_DEADLINE;
    let mut keys: Vec<String> = {
        let ops = recorder.ops.lock().unwrap_or_else(|p| p.into_inner());
        ops.iter().map(|o| o.key.clone()).collect::<std::collections::BTreeSet<_>>().into_iter().collect()
    };
    let mut revision = 0;
    let mut at = 0;
    while let Some(key) = keys.last().cloned() {
        if tokio::time::Instant::now() > until {
            bail!("final reads did not succeed within {:?}", members::SETTLE_DEADLINE);
        }
        at = (at + 1) % endpoints.len();
        let Some(mut c) = load::connect(&endpoints[at]).await else { continue };
        let call = recorder.now();
        let Ok(r) = c.get(key.as_str(), None).await else { continue };
        let read = r.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
        revision = revision.max(r.header().map_or(0, |h| h.revision()));
        recorder.record(Op {
            client,
            call,
            ret: recorder.now(),
            kind: "get",
            key,
            found: read.is_some(),
            read: read.unwrap_or_default(),
            outcome: "ok",
            revision: r.header().map_or(0, |h| h.revision()),
            ..Default::default()
        });
        keys.pop();
    }
    Ok(revision)
}

fn check_linearizability(checker: &Path, history: &Path) -> anyhow::Result<Vec<String>> {
    let output = std::process::Command::new(checker)
        .arg("--history")
        .arg(history)
        .output()
        .with_context(|| format!("running {}", checker.display()))?;
    let said = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    match output.status.code() {
        Some(0) => Ok(Vec::new()),
        Some(1) => Ok(vec![said]),
        _ => bail!("the checker could not tell: {said} {}", String::from_utf8_lossy(&output.stderr)),
    }
}

/// Fault counts per class over runs, for the summary.
pub fn faults_by_class(reports: &[RunReport]) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    for (class, _) in reports.iter().flat_map(|r| &r.faults) {
        *counts.entry(class.name()).or_insert(0) += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::divergence;

    #[test]
    fn members_agree_only_when_every_one_gave_the_same_hash() {
        assert!(divergence(9, &[(0, Some(7)), (1, Some(7)), (2, Some(7))]).is_empty());
        let differ = divergence(9, &[(0, Some(7)), (1, Some(8)), (2, Some(7))]);
        assert_eq!(differ.len(), 1);
        assert!(differ[0].contains("revision 9") && differ[0].contains("member 1: 0x00000008"), "{differ:?}");
        assert_eq!(divergence(9, &[(0, Some(7)), (1, None)]).len(), 1);
        assert_eq!(divergence(9, &[(0, None), (1, None)]).len(), 1);
    }
}
