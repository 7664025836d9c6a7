//! etcd's Range semantics on top of the store's key scan: revision filters, sorting,
//! limit, keys-only and count-only. Shared by plain reads and by reads inside a Txn.

use super::store::{KeySpan, KvError, RangeRequestSpec, RangeResult, ReadView, Returned, WriteBatch};
use crate::proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use crate::proto::etcdserverpb::{RangeRequest, RangeResponse, ResponseHeader};
use crate::proto::mvccpb::KeyValue;

/// Something ranges can be served from: a read view, or a write batch mid-Txn.
pub trait RangeSource {
    fn scan(&self, spec: &RangeRequestSpec<'_>) -> Result<RangeResult, KvError>;
}

impl RangeSource for ReadView {
    fn scan(&self, spec: &RangeRequestSpec<'_>) -> Result<RangeResult, KvError> {
        self.range(spec)
    }
}

impl RangeSource for WriteBatch {
    fn scan(&self, spec: &RangeRequestSpec<'_>) -> Result<RangeResult, KvError> {
        self.range(spec)
    }
}

/// Whether the request's sort options are ones etcd knows (checked before serving).
pub fn valid_sort(request: &RangeRequest) -> bool {
    SortOrder::try_from(request.sort_order).is_ok() && SortTarget::try_from(request.sort_target).is_ok()
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

/// Serves `request` from `source`. The header carries only the revision; the caller adds
/// the member's identity.
pub fn range(source: &impl RangeSource, request: &RangeRequest) -> Result<RangeResponse, KvError> {
    let order = SortOrder::try_from(request.sort_order).unwrap_or_default();
    let target = SortTarget::try_from(request.sort_target).unwrap_or_default();
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
    let spec = RangeRequestSpec {
        span: KeySpan { key: &request.key, range_end: &request.range_end },
        revision: request.revision,
        limit,
        returned: if request.count_only && !filtered {
            Returned::Count
        } else if (request.keys_only && target != SortTarget::Value) || request.count_only {
            // Sorting by value compares them even when only keys are returned; counting
            // under a revision filter needs the revisions, not the values.
            Returned::Keys
        } else {
            Returned::KeyValues
        },
    };
    let mut result = source.scan(&spec)?;
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
        header: Some(ResponseHeader { revision: result.revision, ..ResponseHeader::default() }),
        kvs: result.kvs,
        more: result.more,
        count: result.count,
    })
}
