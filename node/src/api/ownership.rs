//! What the Lock and Election services share, the queue behind etcd's concurrency recipes:
//! every contender for `name` owns one key under `name/`, named after its lease and living
//! under it, and the contender whose key has the smallest create revision holds the lock
//! (leads the election). A contender that is not first waits for the keys before it to be
//! deleted (released, resigned, or gone with their lease).
//!
//! Waits follow this member's watch hub rather than polling: the hub is subscribed before
//! the store is read, so a deletion committed after the read is always seen as a notice.
//! State is read from this member's own store after one read barrier; later re-reads need
//! none, because a notice means this member has applied the change it announces.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use tonic::{Code, Status};

use super::errors::{ApplyError, ServerError};
use super::propose;
use crate::kv::watch::Notice;
use crate::kv::{ReadView, prefix_end};
use crate::member::Node;
use crate::proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use crate::proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use crate::proto::etcdserverpb::request_op::Request as Op;
use crate::proto::etcdserverpb::response_op::Response as OpResponse;
use crate::proto::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, ResponseHeader, TxnRequest, TxnResponse,
};
use crate::proto::mvccpb::KeyValue;
use crate::raft::types::Command;

/// A re-read even without a notice: a safety net should a notice ever be missed (for
/// instance while the store is replaced by a snapshot), cheap because it is rare.
const RECHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The keys of the contenders for `name`.
pub fn prefix(name: &[u8]) -> Vec<u8> {
    let mut prefix = name.to_vec();
    prefix.push(b'/');
    prefix
}

/// The key a contender owns, as etcd's recipes name it: the prefix and the lease in hex,
/// so a contender that asks again with the same lease finds its key instead of queueing
/// behind itself.
pub fn contender_key(name: &[u8], lease: i64) -> Vec<u8> {
    let mut key = prefix(name);
    key.extend_from_slice(format!("{lease:x}").as_bytes());
    key
}

/// A contender's key as it stands in the queue.
pub struct Claim {
    pub kv: KeyValue,
    pub header: ResponseHeader,
    /// Whether this call put the key (rather than finding it from an earlier call).
    pub created: bool,
}

fn compare_create(key: &[u8], revision: i64) -> Compare {
    Compare {
        result: CompareResult::Equal.into(),
        target: CompareTarget::Create.into(),
        key: key.to_vec(),
        target_union: Some(TargetUnion::CreateRevision(revision)),
        range_end: Vec::new(),
    }
}

fn op(request: Op) -> RequestOp {
    RequestOp { request: Some(request) }
}

fn get_op(key: &[u8]) -> RequestOp {
    op(Op::RequestRange(RangeRequest { key: key.to_vec(), ..RangeRequest::default() }))
}

fn put_op(key: &[u8], value: Vec<u8>, lease: i64) -> RequestOp {
    op(Op::RequestPut(PutRequest { key: key.to_vec(), value, lease, ..PutRequest::default() }))
}

async fn txn(node: &Node, request: TxnRequest) -> Result<TxnResponse, Status> {
    let mut response: TxnResponse = propose(node, Command::Txn(request.encode_to_vec())).await?;
    super::finish_header(node, &mut response.header);
    Ok(response)
}

/// Joins the queue: puts `key` under `lease` unless it exists (one Txn, so two calls with
/// the same lease cannot both create it), and answers the key as it is now.
async fn claim(node: &Node, key: &[u8], lease: i64, value: Vec<u8>) -> Result<Claim, Status> {
    // Lease 0 would make every lease-less contender share the key `name/0`, and nothing
    // would release it when its owner goes away.
    if lease == 0 {
        return Err(ApplyError::LeaseNotFound.into());
    }
    let request = TxnRequest {
        compare: vec![compare_create(key, 0)],
        success: vec![put_op(key, value, lease), get_op(key)],
        failure: vec![get_op(key)],
    };
    let response = txn(node, request).await?;
    let kv = response
        .responses
        .iter()
        .rev()
        .find_map(|r| match &r.response {
            Some(OpResponse::ResponseRange(range)) => range.kvs.first().cloned(),
            _ => None,
        })
        .ok_or_else(|| Status::internal("etcdserver: contender key missing after it was written"))?;
    Ok(Claim { kv, header: response.header.unwrap_or_default(), created: response.succeeded })
}

/// `claim`, and the guard that leaves the queue again unless disarmed. The claim runs on a
/// task of its own: a caller that went away while it was under way (its future dropped)
/// left a key it never learned of in the queue, holding up everyone behind it until its
/// lease ran out (a flake of `lock_election.rs` `a_cancelled_lock_waiter_leaves_the_queue`).
pub async fn claim_guarded(
    node: &Arc<Node>,
    key: &[u8],
    lease: i64,
    value: Vec<u8>,
) -> Result<(Claim, LeaveOnDrop), Status> {
    let (answer, answered) = tokio::sync::oneshot::channel();
    let (node, key) = (node.clone(), key.to_vec());
    tokio::spawn(async move {
        let claimed = claim(&node, &key, lease, value).await.map(|claim| {
            let leave = LeaveOnDrop::new(node.clone(), &claim.kv);
            (claim, leave)
        });
        // Refused once the caller has gone: the guard then drops here, leaving the queue.
        let _ = answer.send(claimed);
    });
    answered.await.map_err(|_| Status::internal("etcdserver: the claim of a contender key stopped"))?
}

/// Replaces the value of the key created at `create_revision`, only while it is that key
/// (its owner may have lost it meanwhile) and, given `first_under`, only while it heads that
/// queue; answers whether it was replaced.
pub async fn replace_value(
    node: &Node,
    key: &[u8],
    create_revision: i64,
    lease: i64,
    value: Vec<u8>,
    first_under: Option<&[u8]>,
) -> Result<(bool, ResponseHeader), Status> {
    let mut compare = vec![compare_create(key, create_revision)];
    if let Some(prefix) = first_under {
        // No key of the queue is older: checked in the same Txn as the write, so a leader
        // that has just lost its key cannot overwrite its successor's value.
        compare.push(Compare {
            result: CompareResult::Greater.into(),
            target: CompareTarget::Create.into(),
            key: prefix.to_vec(),
            target_union: Some(TargetUnion::CreateRevision(create_revision - 1)),
            range_end: prefix_end(prefix),
        });
    }
    let request = TxnRequest { compare, success: vec![put_op(key, value, lease)], failure: Vec::new() };
    let response = txn(node, request).await?;
    Ok((response.succeeded, response.header.unwrap_or_default()))
}

/// Deletes the key created at `create_revision`, if it is still that key: a newer key of
/// the same name (same lease, a later claim) belongs to a later call and stays.
pub async fn release(node: &Node, key: &[u8], create_revision: i64) -> Result<ResponseHeader, Status> {
    let request = TxnRequest {
        compare: vec![compare_create(key, create_revision)],
        success: vec![op(Op::RequestDeleteRange(DeleteRangeRequest {
            key: key.to_vec(),
            ..DeleteRangeRequest::default()
        }))],
        failure: Vec::new(),
    };
    Ok(txn(node, request).await?.header.unwrap_or_default())
}

/// The key at the head of the queue under `prefix`: the oldest one, by create revision.
pub fn first_in_line(view: &ReadView, prefix: &[u8]) -> Result<Option<KeyValue>, Status> {
    let request = RangeRequest {
        key: prefix.to_vec(),
        range_end: prefix_end(prefix),
        sort_order: SortOrder::Ascend.into(),
        sort_target: SortTarget::Create.into(),
        limit: 1,
        ..RangeRequest::default()
    };
    Ok(crate::kv::range(view, &request)?.kvs.into_iter().next())
}

/// Waits for the next notice that may change the queue under `prefix`: a committed change
/// of one of its keys, a store replaced by a snapshot, a feed this waiter fell behind on,
/// or the re-check interval passing.
pub async fn next_change(feed: &mut broadcast::Receiver<Arc<Notice>>, prefix: &[u8]) -> Result<(), Status> {
    let wait = async {
        loop {
            match feed.recv().await {
                Ok(notice) => match notice.as_ref() {
                    Notice::Committed { events, .. } => {
                        let touches =
                            events.iter().any(|e| e.kv.as_ref().is_some_and(|kv| kv.key.starts_with(prefix)));
                        if touches {
                            return Ok(());
                        }
                    }
                    Notice::Replaced => return Ok(()),
                },
                Err(RecvError::Lagged(_)) => return Ok(()),
                Err(RecvError::Closed) => return Err(Status::from(ServerError::Stopped)),
            }
        }
    };
    match tokio::time::timeout(RECHECK_INTERVAL, wait).await {
        Ok(result) => result,
        Err(_) => Ok(()),
    }
}

/// Waits until the contender key `own` heads the queue under `prefix`. Fails when the key
/// disappears first: with `requested lease not found` when its lease expired or was
/// revoked, with `lost` when someone deleted the key itself.
pub async fn wait_first(
    node: &Node,
    prefix: &[u8],
    own: &KeyValue,
    lost: &'static str,
) -> Result<(), Status> {
    // Before anything is read: see the module comment.
    let mut feed = node.watch_hub.subscribe();
    node.read_barrier().await?;
    loop {
        {
            let view = node.store.read()?;
            let current =
                crate::kv::range(&view, &RangeRequest { key: own.key.clone(), ..RangeRequest::default() })?;
            let still_ours = current.kvs.first().is_some_and(|kv| kv.create_revision == own.create_revision);
            if !still_ours {
                if view.lease_ttl(own.lease)?.is_none() {
                    return Err(ApplyError::LeaseNotFound.into());
                }
                return Err(Status::new(Code::Unknown, lost));
            }
            if first_in_line(&view, prefix)?.is_some_and(|first| first.create_revision == own.create_revision)
            {
                return Ok(());
            }
        }
        next_change(&mut feed, prefix).await?;
    }
}

/// Releases a contender key unless disarmed: a waiter whose client went away (the call's
/// future is dropped) or whose wait failed must not stay in the queue, where it would hold
/// up everyone behind it until its lease ran out. etcd's recipes do the same.
pub struct LeaveOnDrop {
    node: Arc<Node>,
    key: Vec<u8>,
    create_revision: i64,
    armed: bool,
}

impl LeaveOnDrop {
    pub fn new(node: Arc<Node>, kv: &KeyValue) -> Self {
        Self { node, key: kv.key.clone(), create_revision: kv.create_revision, armed: true }
    }

    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for LeaveOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (node, key, create_revision) =
            (self.node.clone(), std::mem::take(&mut self.key), self.create_revision);
        // Drop cannot wait; the release runs on its own and its failure only leaves the key
        // to its lease.
        tokio::spawn(async move {
            if let Err(status) = release(&node, &key, create_revision).await {
                tracing::info!("could not release abandoned contender key: {}", status.message());
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contender_keys_follow_etcds_recipes() {
        assert_eq!(contender_key(b"job", 0x694d77aa9e7d1a03), b"job/694d77aa9e7d1a03".to_vec());
        assert_eq!(prefix_end(b"job/"), b"job0".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
        assert_eq!(prefix_end(&[0xff]), vec![0]);
    }
}
