//! Applies committed commands to the store: deterministic, so every member that applies
//! the same log reaches the same state and gives the same answers.

use prost::Message;

use super::store::{KeySpan, KvError, WriteBatch};
use crate::api::errors::ApplyError;
use crate::proto::etcdserverpb::{
    DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, ResponseHeader,
};
use crate::raft::types::{Applied, Command};

/// Applies one command. `Err` only for storage failures (the member must stop); a request
/// that is wrong gets `Applied::Error`, as etcd answers it.
pub fn apply_command(batch: &mut WriteBatch, command: &Command) -> Result<Applied, KvError> {
    let outcome = match command {
        Command::Put(bytes) => match PutRequest::decode(bytes.as_slice()) {
            Ok(request) => put(batch, &request)?.map(|r| r.encode_to_vec()),
            Err(e) => Err(ApplyError::Malformed(e.to_string())),
        },
        Command::DeleteRange(bytes) => match DeleteRangeRequest::decode(bytes.as_slice()) {
            Ok(request) => delete_range(batch, &request)?.map(|r| r.encode_to_vec()),
            Err(e) => Err(ApplyError::Malformed(e.to_string())),
        },
    };
    Ok(match outcome {
        Ok(response) => Applied::Response(response),
        Err(error) => Applied::Error(error),
    })
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader { revision, ..ResponseHeader::default() })
}

fn put(batch: &mut WriteBatch, request: &PutRequest) -> Result<Result<PutResponse, ApplyError>, KvError> {
    if request.key.is_empty() {
        return Ok(Err(ApplyError::EmptyKey));
    }
    let span = KeySpan { key: &request.key, range_end: &[] };
    let existing = batch.get(span.key)?;
    if (request.ignore_value || request.ignore_lease) && existing.is_none() {
        return Ok(Err(ApplyError::KeyNotFound));
    }
    let value = match (&existing, request.ignore_value) {
        (Some(kv), true) => kv.value.clone(),
        _ => request.value.clone(),
    };
    let lease = match (&existing, request.ignore_lease) {
        (Some(kv), true) => kv.lease,
        _ => request.lease,
    };
    if lease != 0 {
        // Leases are granted through the Lease API, which this member does not serve yet:
        // no lease exists, so attaching one fails as etcd fails for an unknown lease.
        return Ok(Err(ApplyError::LeaseNotFound));
    }
    let revision = batch.next_revision();
    let previous = batch.put(revision, &request.key, &value, lease)?;
    Ok(Ok(PutResponse { header: header(revision), prev_kv: previous.filter(|_| request.prev_kv) }))
}

fn delete_range(
    batch: &mut WriteBatch,
    request: &DeleteRangeRequest,
) -> Result<Result<DeleteRangeResponse, ApplyError>, KvError> {
    if request.key.is_empty() {
        return Ok(Err(ApplyError::EmptyKey));
    }
    let revision = batch.next_revision();
    let deleted =
        batch.delete_range(revision, KeySpan { key: &request.key, range_end: &request.range_end })?;
    Ok(Ok(DeleteRangeResponse {
        header: header(batch.revision()),
        deleted: deleted.len() as i64,
        prev_kvs: if request.prev_kv { deleted } else { Vec::new() },
    }))
}
