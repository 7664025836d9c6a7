//! Applies committed commands to the store: deterministic, so every member that applies
//! the same log reaches the same state and gives the same answers.
//!
//! A request is checked in full before it writes anything: one apply batch holds many
//! entries, so a request refused halfway would leave its first writes behind.

use prost::Message;

use super::range::{RangeSource, range};
use super::store::{KeySpan, KvError, RangeRequestSpec, WriteBatch, check_revision};
use crate::api::errors::ApplyError;
use crate::proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use crate::proto::etcdserverpb::request_op::Request;
use crate::proto::etcdserverpb::response_op::Response;
use crate::proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, Compare, DeleteRangeRequest, DeleteRangeResponse,
    LeaseGrantRequest, LeaseGrantResponse, LeaseRevokeRequest, LeaseRevokeResponse, PutRequest, PutResponse,
    ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use crate::proto::mvccpb::KeyValue;
use crate::raft::types::{Applied, Command};

/// Why a request was not applied: refused (the client gets the error, nothing changed) or
/// a storage failure (the member must stop).
enum Failure {
    Refused(ApplyError),
    Storage(KvError),
}

impl From<ApplyError> for Failure {
    fn from(e: ApplyError) -> Self {
        Failure::Refused(e)
    }
}

impl From<KvError> for Failure {
    fn from(e: KvError) -> Self {
        match e {
            KvError::Compacted { .. } => Failure::Refused(ApplyError::Compacted),
            KvError::FutureRevision => Failure::Refused(ApplyError::FutureRevision),
            other => Failure::Storage(other),
        }
    }
}

type Outcome<T> = Result<T, Failure>;

fn decoded<T: Message + Default>(bytes: &[u8]) -> Outcome<T> {
    T::decode(bytes).map_err(|e| ApplyError::Malformed(e.to_string()).into())
}

/// Applies one command. `Err` only for storage failures (the member must stop); a request
/// that is wrong gets `Applied::Error`, as etcd answers it.
pub fn apply_command(batch: &mut WriteBatch, command: &Command) -> Result<Applied, KvError> {
    let outcome = match command {
        Command::Put(bytes) => decoded(bytes).and_then(|r| put(batch, &r)).map(|r| r.encode_to_vec()),
        Command::DeleteRange(bytes) => {
            decoded(bytes).and_then(|r| delete_range(batch, &r)).map(|r| r.encode_to_vec())
        }
        Command::Txn(bytes) => decoded(bytes).and_then(|r| txn(batch, &r)).map(|r| r.encode_to_vec()),
        Command::Compact(bytes) => decoded(bytes).and_then(|r| compact(batch, &r)).map(|r| r.encode_to_vec()),
        Command::LeaseGrant(bytes) => {
            decoded(bytes).and_then(|r| lease_grant(batch, &r)).map(|r| r.encode_to_vec())
        }
        Command::LeaseRevoke(bytes) => {
            decoded(bytes).and_then(|r| lease_revoke(batch, &r)).map(|r| r.encode_to_vec())
        }
    };
    match outcome {
        Ok(response) => Ok(Applied::Response(response)),
        Err(Failure::Refused(error)) => Ok(Applied::Error(error)),
        Err(Failure::Storage(error)) => Err(error),
    }
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader { revision, ..ResponseHeader::default() })
}

/// Everything that could refuse a put, checked against the store before any write.
fn check_put(batch: &WriteBatch, request: &PutRequest) -> Outcome<()> {
    if request.key.is_empty() {
        return Err(ApplyError::EmptyKey.into());
    }
    if (request.ignore_value || request.ignore_lease) && batch.get(&request.key)?.is_none() {
        return Err(ApplyError::KeyNotFound.into());
    }
    if request.lease != 0 && batch.lease_ttl(request.lease)?.is_none() {
        return Err(ApplyError::LeaseNotFound.into());
    }
    Ok(())
}

fn write_put(batch: &mut WriteBatch, revision: i64, request: &PutRequest) -> Outcome<PutResponse> {
    let existing = batch.get(&request.key)?;
    let value = match (&existing, request.ignore_value) {
        (Some(kv), true) => kv.value.clone(),
        _ => request.value.clone(),
    };
    let lease = match (&existing, request.ignore_lease) {
        (Some(kv), true) => kv.lease,
        _ => request.lease,
    };
    let previous = batch.put(revision, &request.key, &value, lease)?;
    Ok(PutResponse { header: header(revision), prev_kv: previous.filter(|_| request.prev_kv) })
}

fn put(batch: &mut WriteBatch, request: &PutRequest) -> Outcome<PutResponse> {
    check_put(batch, request)?;
    let revision = batch.next_revision();
    write_put(batch, revision, request)
}

fn delete_range(batch: &mut WriteBatch, request: &DeleteRangeRequest) -> Outcome<DeleteRangeResponse> {
    if request.key.is_empty() {
        return Err(ApplyError::EmptyKey.into());
    }
    let revision = batch.next_revision();
    write_delete(batch, revision, request)
}

fn write_delete(
    batch: &mut WriteBatch,
    revision: i64,
    request: &DeleteRangeRequest,
) -> Outcome<DeleteRangeResponse> {
    let deleted =
        batch.delete_range(revision, KeySpan { key: &request.key, range_end: &request.range_end })?;
    Ok(DeleteRangeResponse {
        header: header(batch.revision()),
        deleted: deleted.len() as i64,
        prev_kvs: if request.prev_kv { deleted } else { Vec::new() },
    })
}

/// A Txn with its branches chosen: etcd decides every nested Txn's branch on the store as
/// it was before the outer Txn ran, and so do we.
struct Decided<'a> {
    succeeded: bool,
    ops: &'a [crate::proto::etcdserverpb::RequestOp],
    /// The decisions of the nested Txns among `ops`, in order.
    nested: Vec<Decided<'a>>,
}

fn decide<'a>(batch: &WriteBatch, request: &'a TxnRequest) -> Outcome<Decided<'a>> {
    let mut succeeded = true;
    for compare in &request.compare {
        if !holds(batch, compare)? {
            succeeded = false;
            break;
        }
    }
    let ops = if succeeded { &request.success } else { &request.failure };
    let mut nested = Vec::new();
    for op in ops {
        if let Some(Request::RequestTxn(inner)) = &op.request {
            nested.push(decide(batch, inner)?);
        }
    }
    Ok(Decided { succeeded, ops, nested })
}

/// Whether `compare` holds for every key it covers; a missing key compares as a key with
/// zero versions and revisions, and never equals a value (etcd's rule).
fn holds(batch: &WriteBatch, compare: &Compare) -> Outcome<bool> {
    let spec = RangeRequestSpec {
        span: KeySpan { key: &compare.key, range_end: &compare.range_end },
        revision: 0,
        limit: 0,
    };
    let kvs = batch.scan(&spec)?.kvs;
    let target = CompareTarget::try_from(compare.target).unwrap_or_default();
    if kvs.is_empty() {
        return Ok(target != CompareTarget::Value && compare_kv(compare, target, &KeyValue::default()));
    }
    Ok(kvs.iter().all(|kv| compare_kv(compare, target, kv)))
}

fn compare_kv(compare: &Compare, target: CompareTarget, kv: &KeyValue) -> bool {
    let ordering = match (target, &compare.target_union) {
        (CompareTarget::Version, Some(TargetUnion::Version(v))) => kv.version.cmp(v),
        (CompareTarget::Create, Some(TargetUnion::CreateRevision(v))) => kv.create_revision.cmp(v),
        (CompareTarget::Mod, Some(TargetUnion::ModRevision(v))) => kv.mod_revision.cmp(v),
        (CompareTarget::Value, Some(TargetUnion::Value(v))) => kv.value.as_slice().cmp(v.as_slice()),
        (CompareTarget::Lease, Some(TargetUnion::Lease(v))) => kv.lease.cmp(v),
        // A constant of another kind than the target compares as its zero value.
        (CompareTarget::Value, _) => kv.value.as_slice().cmp(&[]),
        (CompareTarget::Version, _) => kv.version.cmp(&0),
        (CompareTarget::Create, _) => kv.create_revision.cmp(&0),
        (CompareTarget::Mod, _) => kv.mod_revision.cmp(&0),
        (CompareTarget::Lease, _) => kv.lease.cmp(&0),
    };
    use std::cmp::Ordering::*;
    match CompareResult::try_from(compare.result).unwrap_or_default() {
        CompareResult::Equal => ordering == Equal,
        CompareResult::NotEqual => ordering != Equal,
        CompareResult::Greater => ordering == Greater,
        CompareResult::Less => ordering == Less,
    }
}

/// Checks every request on the chosen path before anything is written.
fn check_decided(batch: &WriteBatch, decided: &Decided<'_>) -> Outcome<()> {
    let mut nested = decided.nested.iter();
    for op in decided.ops {
        match &op.request {
            Some(Request::RequestRange(r)) => {
                check_revision(r.revision, batch.revision(), batch.compact_revision()?)?;
            }
            Some(Request::RequestPut(r)) => check_put(batch, r)?,
            Some(Request::RequestDeleteRange(r)) if r.key.is_empty() => {
                return Err(ApplyError::EmptyKey.into());
            }
            Some(Request::RequestDeleteRange(_)) | None => {}
            Some(Request::RequestTxn(_)) => {
                if let Some(inner) = nested.next() {
                    check_decided(batch, inner)?;
                }
            }
        }
    }
    Ok(())
}

fn run_decided(batch: &mut WriteBatch, revision: i64, decided: &Decided<'_>) -> Outcome<TxnResponse> {
    let mut nested = decided.nested.iter();
    let mut responses = Vec::with_capacity(decided.ops.len());
    for op in decided.ops {
        let response = match &op.request {
            Some(Request::RequestRange(r)) => Response::ResponseRange(range(&*batch, r)?),
            Some(Request::RequestPut(r)) => Response::ResponsePut(write_put(batch, revision, r)?),
            Some(Request::RequestDeleteRange(r)) => {
                Response::ResponseDeleteRange(write_delete(batch, revision, r)?)
            }
            Some(Request::RequestTxn(_)) => match nested.next() {
                Some(inner) => Response::ResponseTxn(run_decided(batch, revision, inner)?),
                None => continue,
            },
            None => continue,
        };
        responses.push(ResponseOp { response: Some(response) });
    }
    Ok(TxnResponse { header: header(batch.revision()), succeeded: decided.succeeded, responses })
}

fn txn(batch: &mut WriteBatch, request: &TxnRequest) -> Outcome<TxnResponse> {
    let decided = decide(batch, request)?;
    check_decided(batch, &decided)?;
    // Every write of the Txn shares one revision.
    let revision = batch.next_revision();
    let mut response = run_decided(batch, revision, &decided)?;
    response.header = header(batch.revision());
    Ok(response)
}

fn compact(batch: &mut WriteBatch, request: &CompactionRequest) -> Outcome<CompactionResponse> {
    if request.revision <= batch.compact_revision()? {
        return Err(ApplyError::Compacted.into());
    }
    if request.revision > batch.revision() {
        return Err(ApplyError::FutureRevision.into());
    }
    batch.compact(request.revision)?;
    Ok(CompactionResponse { header: header(batch.revision()) })
}

fn lease_grant(batch: &mut WriteBatch, request: &LeaseGrantRequest) -> Outcome<LeaseGrantResponse> {
    // The proposing member chose the id and the TTL; applying only records them.
    if request.id <= 0 {
        return Err(ApplyError::Malformed("lease id must be positive".to_owned()).into());
    }
    if batch.lease_ttl(request.id)?.is_some() {
        return Err(ApplyError::LeaseExists.into());
    }
    batch.grant_lease(request.id, request.ttl)?;
    Ok(LeaseGrantResponse {
        header: header(batch.revision()),
        id: request.id,
        ttl: request.ttl,
        error: String::new(),
    })
}

/// Revokes a lease and deletes its keys, all at one revision (as a Txn would).
fn lease_revoke(batch: &mut WriteBatch, request: &LeaseRevokeRequest) -> Outcome<LeaseRevokeResponse> {
    if batch.lease_ttl(request.id)?.is_none() {
        return Err(ApplyError::LeaseNotFound.into());
    }
    let keys = batch.remove_lease(request.id)?;
    let revision = batch.next_revision();
    for key in keys {
        batch.delete_range(revision, KeySpan { key: &key, range_end: &[] })?;
    }
    Ok(LeaseRevokeResponse { header: header(batch.revision()) })
}
