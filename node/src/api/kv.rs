//! The etcd KV service: thin handlers over the member (writes through the log) and the
//! store (reads, linearizable unless the client asks for serializable).

use std::sync::Arc;

use prost::Message;
use tonic::{Request, Response, Status};

use super::errors::ServerError;
use crate::kv::{KeySpan, RangeRequestSpec};
use crate::member::Node;
use crate::proto::etcdserverpb::kv_server::Kv;
use crate::proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use crate::proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use crate::proto::mvccpb::KeyValue;
use crate::raft::types::{Applied, Command};

/// etcd's default limit on a request (`--max-request-bytes`, 1.5 MiB).
pub const MAX_REQUEST_BYTES: usize = 1536 * 1024;

pub struct KvService {
    node: Arc<Node>,
}

impl KvService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    /// Proposes a write and decodes the etcd response the apply layer produced.
    async fn propose<T: Message + Default>(&self, command: Command) -> Result<T, Status> {
        match self.node.write(command).await? {
            Applied::Response(bytes) => {
                T::decode(bytes.as_slice()).map_err(|e| Status::internal(format!("etcdserver: {e}")))
            }
            Applied::Error(e) => Err(e.into()),
            Applied::Nothing => Err(Status::internal("etcdserver: write produced no response")),
        }
    }

    fn finish_header(&self, header: &mut Option<crate::proto::etcdserverpb::ResponseHeader>) {
        let revision = header.as_ref().map_or(0, |h| h.revision);
        *header = Some(self.node.header(revision));
    }
}

fn check_size(encoded_len: usize) -> Result<(), Status> {
    if encoded_len > MAX_REQUEST_BYTES {
        return Err(ServerError::RequestTooLarge.into());
    }
    Ok(())
}

/// Sorts as etcd does: by the target field, then by key for ties; DESCEND reverses.
fn sort(kvs: &mut [KeyValue], order: SortOrder, target: SortTarget) {
    if order == SortOrder::None && target == SortTarget::Key {
        return;
    }
    kvs.sort_by(|a, b| {
        let by_target = match target {
            SortTarget::Key => a.key.cmp(&b.key),
            SortTarget::Version => a.version.cmp(&b.version),
            SortTarget::Create => a.create_revision.cmp(&b.create_revision),
            SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
            SortTarget::Value => a.value.cmp(&b.value),
        };
        by_target.then_with(|| a.key.cmp(&b.key))
    });
    if order == SortOrder::Descend {
        kvs.reverse();
    }
}

/// Serves a range from the store, after the read barrier the request asks for.
pub fn range(node: &Node, request: &RangeRequest) -> Result<RangeResponse, Status> {
    let order = SortOrder::try_from(request.sort_order)
        .map_err(|_| Status::invalid_argument("etcdserver: invalid sort option"))?;
    let target = SortTarget::try_from(request.sort_target)
        .map_err(|_| Status::invalid_argument("etcdserver: invalid sort option"))?;
    let filtered = request.min_mod_revision > 0
        || request.max_mod_revision > 0
        || request.min_create_revision > 0
        || request.max_create_revision > 0;
    // Sorting and filtering need every key before the limit applies.
    let limit =
        if filtered || order != SortOrder::None && target != SortTarget::Key || order == SortOrder::Descend {
            0
        } else {
            usize::try_from(request.limit.max(0)).unwrap_or(usize::MAX)
        };
    let view = node.store.read()?;
    let spec = RangeRequestSpec {
        span: KeySpan { key: &request.key, range_end: &request.range_end },
        revision: request.revision,
        limit,
    };
    let mut result = view.range(&spec)?;
    if filtered {
        result.kvs.retain(|kv| {
            (request.min_mod_revision == 0 || kv.mod_revision >= request.min_mod_revision)
                && (request.max_mod_revision == 0 || kv.mod_revision <= request.max_mod_revision)
                && (request.min_create_revision == 0 || kv.create_revision >= request.min_create_revision)
                && (request.max_create_revision == 0 || kv.create_revision <= request.max_create_revision)
        });
        result.count = result.kvs.len() as i64;
    }
    sort(&mut result.kvs, order, target);
    if request.limit > 0 && result.kvs.len() > request.limit as usize {
        result.kvs.truncate(request.limit as usize);
        result.more = true;
    }
    if request.keys_only {
        for kv in &mut result.kvs {
            kv.value.clear();
        }
    }
    if request.count_only {
        result.kvs.clear();
    }
    Ok(RangeResponse {
        header: Some(node.header(result.revision)),
        kvs: result.kvs,
        more: result.more,
        count: result.count,
    })
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
        let mut response: PutResponse = self.propose(Command::Put(request.encode_to_vec())).await?;
        self.finish_header(&mut response.header);
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
            self.propose(Command::DeleteRange(request.encode_to_vec())).await?;
        self.finish_header(&mut response.header);
        Ok(Response::new(response))
    }

    async fn txn(&self, _request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        Err(Status::unimplemented("etcdserver: Txn is not served by this member yet"))
    }

    async fn compact(
        &self,
        _request: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        Err(Status::unimplemented("etcdserver: Compact is not served by this member yet"))
    }
}
