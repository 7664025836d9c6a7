//! The etcd KV service: thin handlers over the member (writes through the log) and the
//! store (reads, linearizable unless the client asks for serializable).

use std::sync::Arc;

use prost::Message;
use tonic::{Request, Response, Status};

use super::errors::ServerError;
use std::collections::BTreeSet;

use crate::member::Node;
use crate::proto::etcdserverpb::RequestOp;
use crate::proto::etcdserverpb::kv_server::Kv;
use crate::proto::etcdserverpb::request_op::Request as Op;
use crate::proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use crate::raft::types::Command;

/// etcd's default limit on a request (`--max-request-bytes`, 1.5 MiB).
pub const MAX_REQUEST_BYTES: usize = 1536 * 1024;

pub struct KvService {
    node: Arc<Node>,
}

impl KvService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

fn check_size(encoded_len: usize) -> Result<(), Status> {
    if encoded_len > MAX_REQUEST_BYTES {
        return Err(ServerError::RequestTooLarge.into());
    }
    Ok(())
}

/// etcd's default limit on the operations of one Txn branch (`--max-txn-ops`).
pub const MAX_TXN_OPS: usize = 128;

/// The keys a branch puts and the ranges it deletes.
#[derive(Default)]
struct BranchWrites {
    puts: BTreeSet<Vec<u8>>,
    deletes: Vec<(Vec<u8>, Vec<u8>)>,
}

/// etcd's checks of a Txn before it is proposed: branch sizes, sort options, and no key
/// written twice in one branch (two puts, or a put inside a range the branch deletes).
fn check_txn(request: &TxnRequest) -> Result<(), ServerError> {
    txn_writes(request).map(drop)
}

/// The writes of each branch of a Txn, each branch checked. Every nested Txn is looked at
/// once: checking it and then collecting its writes again doubled the work per level, so a
/// Txn nested 40 deep took 2^40 steps.
fn txn_writes(request: &TxnRequest) -> Result<[BranchWrites; 2], ServerError> {
    let branches = [branch_writes(&request.success)?, branch_writes(&request.failure)?];
    if branches
        .iter()
        .any(|writes| writes.deletes.iter().any(|(key, end)| puts_within(&writes.puts, key, end)))
    {
        return Err(ServerError::DuplicateKey);
    }
    Ok(branches)
}

/// Whether a key of `puts` is in the range a DeleteRange of `key` and `range_end` removes
/// (see `KeySpan`). One ordered lookup per range: asking every range about every put cost
/// puts x deletes, which a wide nested Txn makes billions.
fn puts_within(puts: &BTreeSet<Vec<u8>>, key: &[u8], range_end: &[u8]) -> bool {
    use std::ops::Bound::{Excluded, Included, Unbounded};
    let end = match range_end {
        [] => return puts.contains(key),
        [0] => Unbounded,
        end if end > key => Excluded(end),
        _ => return false,
    };
    puts.range::<[u8], _>((Included(key), end)).next().is_some()
}

fn branch_writes(ops: &[RequestOp]) -> Result<BranchWrites, ServerError> {
    if ops.len() > MAX_TXN_OPS {
        return Err(ServerError::TooManyTxnOps);
    }
    let mut writes = BranchWrites::default();
    for op in ops {
        match &op.request {
            Some(Op::RequestRange(r)) if !crate::kv::valid_sort(r) => {
                return Err(ServerError::InvalidSortOption);
            }
            Some(Op::RequestPut(r)) => {
                if !writes.puts.insert(r.key.clone()) {
                    return Err(ServerError::DuplicateKey);
                }
            }
            Some(Op::RequestDeleteRange(r)) => writes.deletes.push((r.key.clone(), r.range_end.clone())),
            Some(Op::RequestTxn(inner)) => {
                // Only one of the nested branches runs, so they may write the same keys as
                // each other, but each must be disjoint from ours.
                let nested = txn_writes(inner)?;
                if nested.iter().any(|n| n.puts.iter().any(|k| writes.puts.contains(k))) {
                    return Err(ServerError::DuplicateKey);
                }
                for n in nested {
                    writes.puts.extend(n.puts);
                    writes.deletes.extend(n.deletes);
                }
            }
            Some(Op::RequestRange(_)) | None => {}
        }
    }
    Ok(writes)
}

/// Serves a range from the store (the caller has passed the read barrier it asks for).
pub fn range(node: &Node, request: &RangeRequest) -> Result<RangeResponse, Status> {
    if !crate::kv::valid_sort(request) {
        return Err(Status::invalid_argument("etcdserver: invalid sort option"));
    }
    let mut response = crate::kv::range(&node.store.read()?, request)?;
    super::finish_header(node, &mut response.header);
    Ok(response)
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(&self, request: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let request = request.into_inner();
        if !request.serializable {
            self.node.read_barrier().await?;
        }
        range(&self.node, &request).map(Response::new)
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let request = request.into_inner();
        check_size(request.encoded_len())?;
        if request.key.is_empty() {
            return Err(super::errors::ApplyError::EmptyKey.into());
        }
        if request.ignore_value && !request.value.is_empty() {
            return Err(Status::invalid_argument("etcdserver: value is provided"));
        }
        if request.ignore_lease && request.lease != 0 {
            return Err(Status::invalid_argument("etcdserver: lease is provided"));
        }
        super::quota::check(&self.node, super::quota::put_cost(&request)).await?;
        let mut response: PutResponse =
            super::propose(&self.node, Command::Put(request.encode_to_vec())).await?;
        super::finish_header(&self.node, &mut response.header);
        Ok(Response::new(response))
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let request = request.into_inner();
        check_size(request.encoded_len())?;
        if request.key.is_empty() {
            return Err(super::errors::ApplyError::EmptyKey.into());
        }
        let mut response: DeleteRangeResponse =
            super::propose(&self.node, Command::DeleteRange(request.encode_to_vec())).await?;
        super::finish_header(&self.node, &mut response.header);
        Ok(Response::new(response))
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let request = request.into_inner();
        check_size(request.encoded_len())?;
        check_txn(&request)?;
        if crate::kv::txn_is_read_only(&request) {
            if !crate::kv::txn_is_serializable(&request) {
                self.node.read_barrier().await?;
            }
            let mut response = crate::kv::read_only_txn(&mut self.node.store.read()?, &request)??;
            super::finish_header(&self.node, &mut response.header);
            return Ok(Response::new(response));
        }
        if crate::kv::txn_puts(&request) {
            super::quota::check(&self.node, super::quota::txn_cost(&request)).await?;
        }
        let mut response: TxnResponse =
            super::propose(&self.node, Command::Txn(request.encode_to_vec())).await?;
        super::finish_header(&self.node, &mut response.header);
        Ok(Response::new(response))
    }

    async fn compact(
        &self,
        request: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let request = request.into_inner();
        let mut response: CompactionResponse =
            super::propose(&self.node, Command::Compact(request.encode_to_vec())).await?;
        super::finish_header(&self.node, &mut response.header);
        Ok(Response::new(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::etcdserverpb::PutRequest;

    fn put(key: &str) -> RequestOp {
        RequestOp { request: Some(Op::RequestPut(PutRequest { key: key.into(), ..Default::default() })) }
    }

    fn delete(key: &str, range_end: &str) -> RequestOp {
        RequestOp {
            request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
                key: key.into(),
                range_end: range_end.into(),
                ..Default::default()
            })),
        }
    }

    fn nested(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> RequestOp {
        RequestOp { request: Some(Op::RequestTxn(TxnRequest { compare: Vec::new(), success, failure })) }
    }

    fn txn(success: Vec<RequestOp>) -> TxnRequest {
        TxnRequest { compare: Vec::new(), success, failure: Vec::new() }
    }

    #[test]
    fn a_key_written_twice_in_one_branch_is_a_duplicate() {
        assert_eq!(check_txn(&txn(vec![put("a"), put("a")])), Err(ServerError::DuplicateKey));
        assert_eq!(check_txn(&txn(vec![delete("a", "c"), put("b")])), Err(ServerError::DuplicateKey));
        assert_eq!(
            check_txn(&txn(vec![put("a"), nested(vec![put("a")], vec![])])),
            Err(ServerError::DuplicateKey)
        );
        assert_eq!(check_txn(&txn(vec![delete("a", "c"), put("c")])), Ok(()));
    }

    #[test]
    fn the_branches_of_a_txn_may_write_the_same_key() {
        let both = TxnRequest { compare: Vec::new(), success: vec![put("a")], failure: vec![put("a")] };
        assert_eq!(check_txn(&both), Ok(()));
        assert_eq!(check_txn(&txn(vec![nested(vec![put("a")], vec![put("a")])])), Ok(()));
    }

    #[test]
    fn a_txn_nested_forty_deep_is_checked_once_per_level() {
        // Each level puts its own key and holds the next level: checked twice per level, as
        // before, this is 2^40 branch walks; once per level, 40.
        let mut request = txn(vec![put("k40")]);
        for level in (0..40).rev() {
            request =
                txn(vec![put(&format!("k{level}")), RequestOp { request: Some(Op::RequestTxn(request)) }]);
        }
        let checked = std::sync::mpsc::channel();
        std::thread::spawn(move || checked.0.send(check_txn(&request)));
        let verdict = checked.1.recv_timeout(std::time::Duration::from_secs(30));
        assert_eq!(verdict, Ok(Ok(())), "a 40-deep Txn is checked (it took 2^40 steps before)");
    }

    #[test]
    fn a_put_inside_any_kind_of_deleted_range_is_a_duplicate() {
        let all_from = |key: &str| RequestOp {
            request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
                key: key.into(),
                range_end: vec![0],
                ..Default::default()
            })),
        };
        assert_eq!(check_txn(&txn(vec![all_from("b"), put("z")])), Err(ServerError::DuplicateKey));
        assert_eq!(check_txn(&txn(vec![all_from("b"), put("a")])), Ok(()));
        assert_eq!(check_txn(&txn(vec![delete("b", ""), put("b")])), Err(ServerError::DuplicateKey));
        assert_eq!(check_txn(&txn(vec![delete("b", ""), put("ba")])), Ok(()));
        // A range ending before it starts deletes nothing.
        assert_eq!(check_txn(&txn(vec![delete("c", "a"), put("b")])), Ok(()));
        assert_eq!(check_txn(&txn(vec![delete("a", "c"), put("c")])), Ok(()));
    }

    #[test]
    fn a_wide_nested_txn_is_checked_without_comparing_every_put_with_every_delete() {
        // A tree of Txns ten deep, each with 63 puts and 63 deletes of keys of its own in both
        // branches: 2,047 Txns, 129,000 puts and as many deletes. Asking every delete about
        // every put, level by level, took more than 10^10 comparisons.
        fn tree(depth: u32, path: &str) -> TxnRequest {
            let branch = |side: &str| {
                let name = format!("{path}{side}");
                let mut ops: Vec<RequestOp> = (0..63).map(|i| put(&format!("p/{name}/{i}"))).collect();
                ops.extend((0..63).map(|i| delete(&format!("d/{name}/{i}"), "")));
                if depth > 0 {
                    ops.push(RequestOp { request: Some(Op::RequestTxn(tree(depth - 1, &name))) });
                }
                ops
            };
            TxnRequest { compare: Vec::new(), success: branch("s"), failure: branch("f") }
        }
        let request = tree(10, "");
        let checked = std::sync::mpsc::channel();
        std::thread::spawn(move || checked.0.send(check_txn(&request)));
        let verdict = checked.1.recv_timeout(std::time::Duration::from_secs(60));
        assert_eq!(verdict, Ok(Ok(())), "the wide Txn is checked");
    }

    #[test]
    fn a_branch_has_at_most_128_operations() {
        let ops = (0..=MAX_TXN_OPS).map(|i| put(&format!("k{i}"))).collect();
        assert_eq!(check_txn(&txn(ops)), Err(ServerError::TooManyTxnOps));
    }
}
