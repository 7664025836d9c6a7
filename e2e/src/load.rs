//! Client load for scenarios on either platform: a writer that records every put the cluster
//! acknowledged, and a sampler of MemberList that records every voter count it saw. Both use
//! the etcd-client crate, a client nobody here wrote, and run on the caller's tokio runtime.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions};

async fn connect(endpoints: &[String]) -> Option<Client> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(Duration::from_secs(2));
    Client::connect(endpoints, Some(options)).await.ok()
}

/// Puts `load/<n>` continuously and records each put the cluster acknowledged.
pub struct Writer {
    stop: Arc<AtomicBool>,
    pub acknowledged: Arc<Mutex<Vec<String>>>,
    pub failed: Arc<Mutex<u64>>,
}

impl Writer {
    pub fn start(runtime: &tokio::runtime::Runtime, endpoints: Vec<String>) -> Self {
        Self::following(runtime, move || endpoints.clone())
    }

    /// Like `start`, with the endpoints asked of `endpoints` (which may block) whenever it
    /// connects: members whose address changes (pods restarted one by one) keep being written to.
    pub fn following(
        runtime: &tokio::runtime::Runtime,
        endpoints: impl Fn() -> Vec<String> + Send + Sync + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acknowledged = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(Mutex::new(0));
        let (s, a, f) = (stop.clone(), acknowledged.clone(), failed.clone());
        let endpoints = Arc::new(endpoints);
        runtime.spawn(async move {
            let mut n = 0u64;
            let mut client = None;
            while !s.load(Ordering::Relaxed) {
                if client.is_none() {
                    let ask = endpoints.clone();
                    let now = tokio::task::spawn_blocking(move || ask()).await.unwrap_or_default();
                    client = connect(&now).await;
                }
                let Some(c) = client.as_mut() else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let key = format!("load/{n:08}");
                match c.put(key.clone(), n.to_string(), None).await {
                    Ok(_) => a.lock().expect("lock").push(key),
                    Err(_) => {
                        *f.lock().expect("lock") += 1;
                        client = None;
                    }
                }
                n += 1;
            }
        });
        Self { stop, acknowledged, failed }
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Every acknowledged key that a linearizable read does not return.
    pub fn missing(&self, runtime: &tokio::runtime::Runtime, endpoints: Vec<String>) -> (usize, Vec<String>) {
        let acknowledged = self.acknowledged.lock().expect("lock").clone();
        let present = runtime.block_on(async {
            let mut client = connect(&endpoints).await.expect("connect for the read-back");
            let got = client.get("load/", Some(GetOptions::new().with_prefix().with_keys_only())).await;
            let got = got.expect("read back the load");
            got.kvs().iter().map(|kv| String::from_utf8_lossy(kv.key()).into_owned()).collect::<Vec<_>>()
        });
        let present: BTreeSet<String> = present.into_iter().collect();
        let missing = acknowledged.iter().filter(|k| !present.contains(*k)).cloned().collect();
        (acknowledged.len(), missing)
    }
}

/// What the sampler saw.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    pub taken: u64,
    pub max_voters: usize,
    pub min_voters: usize,
    /// Voter counts that were even, with the member ids then.
    pub even: Vec<(usize, Vec<u64>)>,
    /// Members that left the list while they were the leader last seen.
    pub leader_removed: Vec<u64>,
    pub removals_seen: u64,
    pub cluster_ids: BTreeSet<u64>,
}

/// Polls MemberList (and Status for the leader) every `interval`.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    pub samples: Arc<Mutex<Samples>>,
}

impl Sampler {
    pub fn start(runtime: &tokio::runtime::Runtime, endpoints: Vec<String>, interval: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Samples { min_voters: usize::MAX, ..Samples::default() }));
        let (s, out) = (stop.clone(), samples.clone());
        runtime.spawn(async move {
            let mut client = None;
            let mut previous: Option<(Vec<u64>, u64)> = None;
            let mut tick = tokio::time::interval(interval);
            while !s.load(Ordering::Relaxed) {
                tick.tick().await;
                if client.is_none() {
                    client = connect(&endpoints).await;
                }
                let Some(c) = client.as_mut() else { continue };
                let (Ok(list), Ok(status)) = (c.member_list().await, c.status().await) else {
                    client = None;
                    continue;
                };
                let ids: Vec<u64> = list.members().iter().map(|m| m.id()).collect();
                let voters = list.members().iter().filter(|m| !m.is_learner()).count();
                let mut out = out.lock().expect("lock");
                out.taken += 1;
                out.max_voters = out.max_voters.max(voters);
                out.min_voters = out.min_voters.min(voters);
                if let Some(header) = list.header() {
                    out.cluster_ids.insert(header.cluster_id());
                }
                if voters % 2 == 0 {
                    out.even.push((voters, ids.clone()));
                }
                if let Some((before, leader_then)) = &previous {
                    for gone in before.iter().filter(|id| !ids.contains(id)) {
                        out.removals_seen += 1;
                        if gone == leader_then || *gone == status.leader() {
                            out.leader_removed.push(*gone);
                        }
                    }
                }
                previous = Some((ids, status.leader()));
            }
        });
        Self { stop, samples }
    }

    pub fn stop(&self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        self.samples.lock().expect("lock").clone()
    }
}
