//! The client load of a chaos run, through the etcd-client crate (a client nobody here
//! wrote): KV clients (put, get linearizable and serializable, delete, compare-and-swap Txn),
//! a lease client (grant, put with the lease, revoke), lock clients, and a watch on every key
//! that resumes where it stopped. Everything is recorded with its call and return times.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, LockOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};

use super::history::{Acquisition, Event, LOCK_LEASE_NS, Op};
use super::plan::Rng;

/// Keys the KV clients share: few, so that requests meet on the same keys.
const KEYS: u64 = 6;
/// Keys the lease client attaches its leases to.
const LEASE_KEYS: u64 = 3;
const LOCK_NAME: &str = "chaos-lock";

/// What the load recorded; shared by its tasks.
pub struct Recorder {
    start: Instant,
    stop: AtomicBool,
    pub ops: Mutex<Vec<Op>>,
    pub locks: Mutex<Vec<Acquisition>>,
}

impl Recorder {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            stop: AtomicBool::new(false),
            ops: Mutex::default(),
            locks: Mutex::default(),
        })
    }

    pub fn now(&self) -> i64 {
        self.start.elapsed().as_nanos() as i64
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    pub fn record(&self, op: Op) {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).push(op);
    }
}

pub async fn connect(endpoint: &str) -> Option<Client> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(500))
        .with_timeout(Duration::from_secs(2));
    Client::connect([endpoint], Some(options)).await.ok()
}

/// An error after which a write surely did not happen: etcd's answers of a request it
/// refused (bad input, a compare, a lease it does not have). Anything else (a timeout, a
/// lost connection, no leader) leaves the outcome unknown.
fn definite(error: &etcd_client::Error) -> bool {
    use tonic::Code::*;
    matches!(error, etcd_client::Error::GRpcStatus(s) if matches!(s.code(), InvalidArgument | NotFound | FailedPrecondition | OutOfRange))
}

/// The outcome of a write's error, or None when the request surely did nothing.
fn failed_write(error: &etcd_client::Error) -> Option<&'static str> {
    (!definite(error)).then_some("unknown")
}

fn revision_of(header: Option<&etcd_client::ResponseHeader>) -> i64 {
    header.map_or(0, |h| h.revision())
}

/// A KV client bound to one member, until the recorder stops.
pub async fn kv_client(recorder: Arc<Recorder>, client_id: usize, endpoint: String, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut client = None;
    let mut written = 0u64;
    while !recorder.stopped() {
        let Some(c) = client.as_mut() else {
            client = connect(&endpoint).await;
            if client.is_none() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            continue;
        };
        let key = format!("k{}", rng.below(KEYS));
        let base = Op { client: client_id, key: key.clone(), ..Default::default() };
        let call = recorder.now();
        let choice = rng.below(100);
        let op = if choice < 35 {
            written += 1;
            let value = format!("c{client_id}-{written}");
            match c.put(key.as_str(), value.as_str(), None).await {
                Ok(r) => Op {
                    kind: "put",
                    value,
                    outcome: "ok",
                    revision: revision_of(r.header()),
                    ret: recorder.now(),
                    ..base
                },
                Err(e) => match failed_write(&e) {
                    Some(outcome) => Op { kind: "put", value, outcome, ret: -1, ..base },
                    None => continue,
                },
            }
        } else if choice < 70 {
            let serializable = choice >= 60;
            let options = serializable.then(|| GetOptions::new().with_serializable());
            match c.get(key.as_str(), options).await {
                Ok(r) => {
                    let read = r.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
                    Op {
                        kind: "get",
                        found: read.is_some(),
                        read: read.unwrap_or_default(),
                        serializable,
                        outcome: "ok",
                        revision: revision_of(r.header()),
                        ret: recorder.now(),
                        ..base
                    }
                }
                // A read that failed changed nothing.
                Err(_) => continue,
            }
        } else if choice < 80 {
            match c.delete(key.as_str(), None).await {
                Ok(r) => Op {
                    kind: "delete",
                    deleted: r.deleted(),
                    outcome: "ok",
                    revision: revision_of(r.header()),
                    ret: recorder.now(),
                    ..base
                },
                Err(e) => match failed_write(&e) {
                    Some(outcome) => Op { kind: "delete", outcome, ret: -1, ..base },
                    None => continue,
                },
            }
        } else {
            // Swap from the value last read (or from "absent"), as a lock or a config update would.
            written += 1;
            let value = format!("c{client_id}-{written}");
            let expect = last_read(&recorder, client_id, &key);
            let compare = match &expect {
                Some(v) => Compare::value(key.as_str(), CompareOp::Equal, v.as_str()),
                None => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
            };
            let txn = Txn::new()
                .when([compare])
                .and_then([TxnOp::put(key.as_str(), value.as_str(), None)])
                .or_else([TxnOp::get(key.as_str(), None)]);
            match c.txn(txn).await {
                Ok(r) => {
                    let read = r.op_responses().into_iter().find_map(|o| match o {
                        TxnOpResponse::Get(g) => {
                            Some(g.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
                        }
                        _ => None,
                    });
                    let read = read.flatten();
                    Op {
                        kind: "cas",
                        value,
                        expect,
                        succeeded: r.succeeded(),
                        found: read.is_some(),
                        read: read.unwrap_or_default(),
                        outcome: "ok",
                        revision: revision_of(r.header()),
                        ret: recorder.now(),
                        ..base
                    }
                }
                Err(e) => match failed_write(&e) {
                    Some(outcome) => Op { kind: "cas", value, expect, outcome, ret: -1, ..base },
                    None => continue,
                },
            }
        };
        let failed = op.outcome != "ok";
        recorder.record(Op { call, ..op });
        if failed {
            // The member may be gone: connect again (and do not spin on a dead one).
            client = None;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The value this client last saw for `key` (a read, or its own acknowledged write).
fn last_read(recorder: &Recorder, client_id: usize, key: &str) -> Option<String> {
    let ops = recorder.ops.lock().unwrap_or_else(|p| p.into_inner());
    ops.iter().rev().filter(|o| o.client == client_id && o.key == key && o.outcome == "ok").find_map(|o| {
        match o.kind {
            "get" => Some(o.found.then(|| o.read.clone())),
            "put" => Some(Some(o.value.clone())),
            "cas" if o.succeeded => Some(Some(o.value.clone())),
            "cas" => Some(o.found.then(|| o.read.clone())),
            "delete" => Some(None),
            _ => None,
        }
    })?
}

/// Grants leases, puts a key with each, sometimes overwrites it without one, and revokes.
pub async fn lease_client(recorder: Arc<Recorder>, client_id: usize, endpoints: Vec<String>, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut written = 0u64;
    while !recorder.stopped() {
        let endpoint = &endpoints[rng.below(endpoints.len() as u64) as usize];
        let Some(mut c) = connect(endpoint).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        // Long enough never to expire within a run: expiry is not what this checks.
        let Ok(granted) = c.lease_grant(300, None).await else { continue };
        let lease = granted.id();
        let key = format!("l{}", rng.below(LEASE_KEYS));
        for with_lease in [true, rng.below(4) == 0] {
            written += 1;
            let value = format!("c{client_id}-{written}");
            let lease_id = if with_lease { lease } else { 0 };
            let options = with_lease.then(|| PutOptions::new().with_lease(lease));
            let base = Op {
                client: client_id,
                kind: "put",
                key: key.clone(),
                value,
                lease: lease_id,
                ..Default::default()
            };
            let call = recorder.now();
            let op = match c.put(key.as_str(), base.value.as_str(), options).await {
                Ok(r) => {
                    Op { call, ret: recorder.now(), outcome: "ok", revision: revision_of(r.header()), ..base }
                }
                Err(e) => match failed_write(&e) {
                    Some(outcome) => Op { call, ret: -1, outcome, ..base },
                    None => continue,
                },
            };
            recorder.record(op);
        }
        let base = Op { client: client_id, kind: "revoke", key: key.clone(), lease, ..Default::default() };
        let call = recorder.now();
        match c.lease_revoke(lease).await {
            Ok(_) => recorder.record(Op { call, ret: recorder.now(), outcome: "ok", ..base }),
            Err(e) => {
                if let Some(outcome) = failed_write(&e) {
                    recorder.record(Op { call, ret: -1, outcome, ..base });
                }
            }
        }
    }
}

/// Takes the lock, reads its fencing token (the lock key's create revision), lets it go.
pub async fn lock_client(recorder: Arc<Recorder>, endpoints: Vec<String>, seed: u64) {
    let mut rng = Rng::new(seed);
    while !recorder.stopped() {
        let endpoint = &endpoints[rng.below(endpoints.len() as u64) as usize];
        let Some(mut c) = connect(endpoint).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let lease_asked = recorder.now();
        let Ok(granted) = c.lease_grant(LOCK_LEASE_NS / 1_000_000_000, None).await else { continue };
        let Ok(Ok(locked)) = tokio::time::timeout(
            Duration::from_secs(5),
            c.lock(LOCK_NAME, Some(LockOptions::new().with_lease(granted.id()))),
        )
        .await
        else {
            let _ = c.lease_revoke(granted.id()).await;
            continue;
        };
        let acknowledged = recorder.now();
        let key = locked.key().to_vec();
        let held = c.get(key.clone(), None).await;
        let released = recorder.now();
        if let Ok(held) = held
            && let Some(kv) = held.kvs().first()
        {
            let revision = kv.create_revision();
            let acquisition = Acquisition { lease_asked, acknowledged, released, revision };
            recorder.locks.lock().unwrap_or_else(|p| p.into_inner()).push(acquisition);
        }
        let _ = c.unlock(key).await;
        let _ = c.lease_revoke(granted.id()).await;
    }
}

fn event_of(e: &etcd_client::Event) -> Option<Event> {
    let kv = e.kv()?;
    Some(Event {
        revision: kv.mod_revision(),
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: (e.event_type() == EventType::Put).then(|| String::from_utf8_lossy(kv.value()).into_owned()),
    })
}

/// Events of every key from `from` up to (at least) the revision `until` holds once it holds
/// one (the live watch is told the final revision only after the load ends), resuming on
/// another member after a lost stream at the revision after the last delivered.
pub async fn watch_all(
    endpoints: Vec<String>,
    from: i64,
    until: tokio::sync::watch::Receiver<Option<i64>>,
    mut sink: impl FnMut(Event),
) {
    let mut next = from;
    let mut member = 0;
    let done = |next: i64| until.borrow().is_some_and(|u| next > u);
    while !done(next) {
        member = (member + 1) % endpoints.len();
        let Some(mut c) = connect(&endpoints[member]).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let options = WatchOptions::new().with_all_keys().with_start_revision(next);
        let Ok(mut stream) = c.watch("", Some(options)).await else { continue };
        loop {
            let message = tokio::time::timeout(Duration::from_millis(500), stream.message()).await;
            match message {
                Ok(Ok(Some(response))) => {
                    if response.canceled() {
                        break;
                    }
                    for event in response.events().iter().filter_map(event_of) {
                        next = event.revision + 1;
                        sink(event);
                    }
                }
                Ok(_) => break,
                // Quiet for a while: fine, unless the watch has come far enough.
                Err(_) => {}
            }
            if done(next) {
                return;
            }
        }
    }
}
