//! The backend quota: etcd's `--quota-backend-bytes`. A write that would grow the store past
//! it raises the NOSPACE alarm through the log, after which every member refuses writes that
//! add data (see `kv::apply`) until an operator frees space and disarms the alarm.

use prost::Message;
use tonic::Status;

use super::errors::ApplyError;
use crate::member::Node;
use crate::proto::etcdserverpb::alarm_request::AlarmAction;
use crate::proto::etcdserverpb::{AlarmRequest, AlarmType, PutRequest, TxnRequest};
use crate::raft::types::Command;

/// etcd's default quota: 2 GiB.
pub const DEFAULT_QUOTA_BYTES: u64 = 2 << 30;
/// What etcd adds per key to estimate the space a write takes.
const KEY_OVERHEAD: u64 = 256;

pub fn put_cost(request: &PutRequest) -> u64 {
    (request.key.len() + request.value.len()) as u64 + KEY_OVERHEAD
}

pub fn txn_cost(request: &TxnRequest) -> u64 {
    use crate::proto::etcdserverpb::request_op::Request;
    request
        .success
        .iter()
        .chain(&request.failure)
        .map(|op| match &op.request {
            Some(Request::RequestPut(put)) => put_cost(put),
            Some(Request::RequestTxn(inner)) => txn_cost(inner),
            _ => 0,
        })
        .sum()
}

/// The cost of a lease grant: one record.
pub const LEASE_COST: u64 = KEY_OVERHEAD;

/// Refuses a write of `cost` bytes that would take the store past the quota, raising the
/// NOSPACE alarm for this member so the whole cluster stops taking such writes.
pub async fn check(node: &Node, cost: u64) -> Result<(), Status> {
    let size = node.recent_db_size();
    if size.saturating_add(cost) <= node.quota_bytes {
        return Ok(());
    }
    // Once raised, every member refuses such writes in the apply layer anyway; raising it
    // again would only add a log entry per refused write.
    let raised = crate::kv::alarms_of(&node.store.read()?)?
        .iter()
        .any(|a| a.member_id == node.identity.member_id && a.alarm == AlarmType::Nospace as i32);
    if raised {
        return Err(ApplyError::NoSpace.into());
    }
    let raise = AlarmRequest {
        action: AlarmAction::Activate as i32,
        member_id: node.identity.member_id,
        alarm: AlarmType::Nospace as i32,
    };
    tracing::warn!(size, quota = node.quota_bytes, "the store reached its quota; raising the NOSPACE alarm");
    if let Err(e) = node.write(Command::Alarm(raise.encode_to_vec())).await {
        tracing::warn!("raising the NOSPACE alarm: {e}");
    }
    Err(ApplyError::NoSpace.into())
}
