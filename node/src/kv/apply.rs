//! Applies committed commands to the store: deterministic, so every member that applies
//! the same log reaches the same state and gives the same answers.
//!
//! A request is checked in full before it writes anything: one apply batch holds many
//! entries, so a request refused halfway would leave its first writes behind.

use prost::Message;

use super::range::{RangeSource, range};
use super::store::{
    Applying, KeySpan, KvError, RangeRequestSpec, ReadView, Returned, WriteBatch, check_revision,
};
use crate::api::errors::ApplyError;
use crate::proto::etcdserverpb::alarm_request::AlarmAction;
use crate::proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use crate::proto::etcdserverpb::request_op::Request;
use crate::proto::etcdserverpb::response_op::Response;
use crate::proto::etcdserverpb::{
    AlarmMember, AlarmRequest, AlarmResponse, AlarmType, CompactionRequest, CompactionResponse, Compare,
    DeleteRangeRequest, DeleteRangeResponse, LeaseGrantRequest, LeaseGrantResponse, LeaseRevokeRequest,
    LeaseRevokeResponse, PutRequest, PutResponse, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use crate::proto::mvccpb::{Event, KeyValue};
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
pub fn apply_command(applying: &mut Applying<'_>, command: &Command) -> Result<Applied, KvError> {
    let outcome = match command {
        Command::Put(bytes) => {
            decoded(bytes).and_then(|r| put(applying.batch(), &r)).map(|r| r.encode_to_vec())
        }
        Command::DeleteRange(bytes) => {
            decoded(bytes).and_then(|r| delete_range(applying, &r)).map(|r| r.encode_to_vec())
        }
        Command::Txn(bytes) => {
            decoded(bytes).and_then(|r| txn(applying.batch(), &r)).map(|r| r.encode_to_vec())
        }
        Command::Compact(bytes) => {
            decoded(bytes).and_then(|r| compact(applying.batch(), &r)).map(|r| r.encode_to_vec())
        }
        Command::LeaseGrant(bytes) => {
            decoded(bytes).and_then(|r| lease_grant(applying.batch(), &r)).map(|r| r.encode_to_vec())
        }
        Command::LeaseRevoke(bytes) => {
            decoded(bytes).and_then(|r| lease_revoke(applying.batch(), &r)).map(|r| r.encode_to_vec())
        }
        Command::Alarm(bytes) => {
            decoded(bytes).and_then(|r| alarm(applying.batch(), &r)).map(|r| r.encode_to_vec())
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
    // The store reads the previous version as it writes; only a put that keeps part of it
    // needs it first.
    let keeps_some = request.ignore_value || request.ignore_lease;
    let existing = if keeps_some { batch.get(&request.key)? } else { None };
    let value = match (&existing, request.ignore_value) {
        (Some(kv), true) => kv.value.as_slice(),
        _ => request.value.as_slice(),
    };
    let lease = match (&existing, request.ignore_lease) {
        (Some(kv), true) => kv.lease,
        _ => request.lease,
    };
    let previous = batch.put(revision, &request.key, value, lease, request.prev_kv)?;
    Ok(PutResponse { header: header(revision), prev_kv: previous.filter(|_| request.prev_kv) })
}

fn put(batch: &mut WriteBatch, request: &PutRequest) -> Outcome<PutResponse> {
    refuse_when_out_of_space(batch)?;
    check_put(batch, request)?;
    let revision = batch.next_revision();
    write_put(batch, revision, request)
}

fn delete_range(applying: &mut Applying<'_>, request: &DeleteRangeRequest) -> Outcome<DeleteRangeResponse> {
    if request.key.is_empty() {
        return Err(ApplyError::EmptyKey.into());
    }
    let revision = applying.batch().next_revision();
    let span = KeySpan { key: &request.key, range_end: &request.range_end };
    let response = deleted(applying.delete_range(revision, span, request.prev_kv)?, request);
    Ok(DeleteRangeResponse { header: header(applying.batch().revision()), ..response })
}

/// A DeleteRange in a Txn.
fn write_delete(
    batch: &mut WriteBatch,
    revision: i64,
    request: &DeleteRangeRequest,
) -> Outcome<DeleteRangeResponse> {
    let span = KeySpan { key: &request.key, range_end: &request.range_end };
    let response = deleted(batch.delete_range(revision, span, request.prev_kv)?, request);
    Ok(DeleteRangeResponse { header: header(batch.revision()), ..response })
}

/// The answer to `request`, whose deletions are `events`, but for its header.
fn deleted(events: &[Event], request: &DeleteRangeRequest) -> DeleteRangeResponse {
    let prev_kvs =
        if request.prev_kv { events.iter().filter_map(|e| e.prev_kv.clone()).collect() } else { Vec::new() };
    DeleteRangeResponse { header: None, deleted: events.len() as i64, prev_kvs }
}

/// A Txn with its branches chosen: etcd decides every nested Txn's branch on the store as
/// it was before the outer Txn ran, and so do we.
struct Decided<'a> {
    succeeded: bool,
    ops: &'a [crate::proto::etcdserverpb::RequestOp],
    /// The decisions of the nested Txns among `ops`, in order.
    nested: Vec<Decided<'a>>,
}

fn decide<'a>(batch: &impl RangeSource, request: &'a TxnRequest) -> Outcome<Decided<'a>> {
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
fn holds(batch: &impl RangeSource, compare: &Compare) -> Outcome<bool> {
    let target = CompareTarget::try_from(compare.target).unwrap_or_default();
    let spec = RangeRequestSpec {
        span: KeySpan { key: &compare.key, range_end: &compare.range_end },
        revision: 0,
        limit: 0,
        returned: if target == CompareTarget::Value { Returned::KeyValues } else { Returned::Keys },
    };
    let kvs = batch.scan(&spec)?.kvs;
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

/// Where a Txn's chosen branch runs: the apply batch, or a read view for a Txn that writes
/// nothing (served as a read, not through the log).
trait TxnTarget: RangeSource {
    fn current_revision(&self) -> Result<i64, KvError>;
    fn put_at(&mut self, revision: i64, request: &PutRequest) -> Outcome<PutResponse>;
    fn delete_at(&mut self, revision: i64, request: &DeleteRangeRequest) -> Outcome<DeleteRangeResponse>;
}

impl TxnTarget for WriteBatch {
    fn current_revision(&self) -> Result<i64, KvError> {
        Ok(self.revision())
    }
    fn put_at(&mut self, revision: i64, request: &PutRequest) -> Outcome<PutResponse> {
        write_put(self, revision, request)
    }
    fn delete_at(&mut self, revision: i64, request: &DeleteRangeRequest) -> Outcome<DeleteRangeResponse> {
        write_delete(self, revision, request)
    }
}

impl TxnTarget for ReadView {
    fn current_revision(&self) -> Result<i64, KvError> {
        self.revision()
    }
    // `txn_is_read_only` lets no Txn with a write come here.
    fn put_at(&mut self, _: i64, _: &PutRequest) -> Outcome<PutResponse> {
        Err(ApplyError::Malformed("a put in a Txn served as a read".to_owned()).into())
    }
    fn delete_at(&mut self, _: i64, _: &DeleteRangeRequest) -> Outcome<DeleteRangeResponse> {
        Err(ApplyError::Malformed("a delete in a Txn served as a read".to_owned()).into())
    }
}

fn run_decided(target: &mut impl TxnTarget, revision: i64, decided: &Decided<'_>) -> Outcome<TxnResponse> {
    let mut nested = decided.nested.iter();
    let mut responses = Vec::with_capacity(decided.ops.len());
    for op in decided.ops {
        let response = match &op.request {
            Some(Request::RequestRange(r)) => Response::ResponseRange(range(&*target, r)?),
            Some(Request::RequestPut(r)) => Response::ResponsePut(target.put_at(revision, r)?),
            Some(Request::RequestDeleteRange(r)) => {
                Response::ResponseDeleteRange(target.delete_at(revision, r)?)
            }
            Some(Request::RequestTxn(_)) => match nested.next() {
                Some(inner) => Response::ResponseTxn(run_decided(target, revision, inner)?),
                None => continue,
            },
            None => continue,
        };
        responses.push(ResponseOp { response: Some(response) });
    }
    Ok(TxnResponse { header: header(target.current_revision()?), succeeded: decided.succeeded, responses })
}

/// Whether no branch of `request` writes, nested Txns included. Such a Txn is served as a
/// read, from the store as it is after a read barrier, as etcd serves it: through the log it
/// cost an entry and an fsync on a quorum, and changed nothing.
pub fn txn_is_read_only(request: &TxnRequest) -> bool {
    request.success.iter().chain(&request.failure).all(|op| match &op.request {
        Some(Request::RequestRange(_)) | None => true,
        Some(Request::RequestTxn(inner)) => txn_is_read_only(inner),
        Some(Request::RequestPut(_) | Request::RequestDeleteRange(_)) => false,
    })
}

/// Whether every op of a read-only Txn is a range that asks to be serializable, etcd's rule
/// for serving it without a read barrier: an empty op or a nested Txn does not ask, so its
/// compares are judged on what the leader confirms, not on a follower's possibly stale store.
pub fn txn_is_serializable(request: &TxnRequest) -> bool {
    request.success.iter().chain(&request.failure).all(|op| match &op.request {
        Some(Request::RequestRange(r)) => r.serializable,
        _ => false,
    })
}

/// Serves a Txn that `txn_is_read_only` accepts from `view`: the refusal a client gets
/// (a compacted revision, say) inside, a storage failure outside.
pub fn read_only_txn(
    view: &mut ReadView,
    request: &TxnRequest,
) -> Result<Result<TxnResponse, ApplyError>, KvError> {
    let outcome = decide(&*view, request).and_then(|decided| {
        let revision = view.revision()?;
        run_decided(view, revision, &decided)
    });
    match outcome {
        Ok(response) => Ok(Ok(response)),
        Err(Failure::Refused(error)) => Ok(Err(error)),
        Err(Failure::Storage(error)) => Err(error),
    }
}

fn txn(batch: &mut WriteBatch, request: &TxnRequest) -> Outcome<TxnResponse> {
    if txn_puts(request) {
        refuse_when_out_of_space(batch)?;
    }
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
    refuse_when_out_of_space(batch)?;
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
        batch.delete_range(revision, KeySpan { key: &key, range_end: &[] }, false)?;
    }
    Ok(LeaseRevokeResponse { header: header(batch.revision()) })
}

/// Whether a Txn puts anything, in any branch at any depth (etcd refuses such a Txn while
/// the space alarm is raised, whichever branch would run).
pub fn txn_puts(request: &TxnRequest) -> bool {
    request.success.iter().chain(&request.failure).any(|op| match &op.request {
        Some(Request::RequestPut(_)) => true,
        Some(Request::RequestTxn(inner)) => txn_puts(inner),
        _ => false,
    })
}

const META_ALARMS: &str = "alarms";

/// The raised alarms, as of `meta` (a read view's or a batch's meta table).
pub fn active_alarms(meta: Option<Vec<u8>>) -> Result<Vec<AlarmMember>, KvError> {
    let Some(bytes) = meta else { return Ok(Vec::new()) };
    AlarmResponse::decode(bytes.as_slice())
        .map(|list| list.alarms)
        .map_err(|e| KvError::Corrupt { key: META_ALARMS.as_bytes().to_vec(), reason: e.to_string() })
}

pub fn alarms_of(view: &super::ReadView) -> Result<Vec<AlarmMember>, KvError> {
    active_alarms(view.meta(META_ALARMS)?)
}

/// While any member's space alarm is raised, writes that add data are refused on every
/// member alike (deletes and compaction still run, to free space).
fn refuse_when_out_of_space(batch: &WriteBatch) -> Outcome<()> {
    let alarms = active_alarms(batch.meta(META_ALARMS)?)?;
    if alarms.iter().any(|a| a.alarm == AlarmType::Nospace as i32) {
        return Err(ApplyError::NoSpace.into());
    }
    Ok(())
}

/// Raises or clears an alarm; answers with the alarm it changed (none if nothing changed).
fn alarm(batch: &mut WriteBatch, request: &AlarmRequest) -> Outcome<AlarmResponse> {
    let mut alarms = active_alarms(batch.meta(META_ALARMS)?)?;
    let this = AlarmMember { member_id: request.member_id, alarm: request.alarm };
    let present = alarms.contains(&this);
    let changed = match AlarmAction::try_from(request.action) {
        Ok(AlarmAction::Activate) if !present && request.alarm != AlarmType::None as i32 => {
            alarms.push(this);
            true
        }
        Ok(AlarmAction::Deactivate) if present => {
            alarms.retain(|a| a != &this);
            true
        }
        Ok(_) => false,
        Err(_) => return Err(ApplyError::Malformed("unknown alarm action".to_owned()).into()),
    };
    if changed {
        let list = AlarmResponse { header: None, alarms };
        batch.set_meta(META_ALARMS, &list.encode_to_vec())?;
    }
    Ok(AlarmResponse {
        header: header(batch.revision()),
        alarms: if changed { vec![this] } else { Vec::new() },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::MvccStore;
    use crate::proto::etcdserverpb::{RangeRequest, RequestOp, TxnRequest};

    struct Fixture {
        _dir: tempfile::TempDir,
        store: MvccStore,
    }

    fn store() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = MvccStore::open(&dir.path().join("kv.redb")).expect("open");
        Fixture { _dir: dir, store }
    }

    fn apply(store: &MvccStore, command: Command) -> Applied {
        let mut applying = store.applying(false).expect("applying");
        let applied = apply_command(&mut applying, &command).expect("storage");
        applying.finish().expect("commit");
        applied
    }

    fn put_request(key: &str, value: &str, lease: i64) -> PutRequest {
        PutRequest { key: key.into(), value: value.into(), lease, ..Default::default() }
    }

    fn put(store: &MvccStore, key: &str, value: &str) -> PutResponse {
        match apply(store, Command::Put(put_request(key, value, 0).encode_to_vec())) {
            Applied::Response(bytes) => PutResponse::decode(bytes.as_slice()).expect("decode"),
            other => panic!("put refused: {other:?}"),
        }
    }

    fn txn(store: &MvccStore, request: TxnRequest) -> Result<TxnResponse, ApplyError> {
        match apply(store, Command::Txn(request.encode_to_vec())) {
            Applied::Response(bytes) => Ok(TxnResponse::decode(bytes.as_slice()).expect("decode")),
            Applied::Error(e) => Err(e),
            Applied::Nothing => panic!("no answer"),
        }
    }

    fn op(request: Request) -> RequestOp {
        RequestOp { request: Some(request) }
    }

    fn compare(key: &str, target: CompareTarget, result: CompareResult, constant: TargetUnion) -> Compare {
        Compare {
            key: key.into(),
            target: target as i32,
            result: result as i32,
            target_union: Some(constant),
            range_end: Vec::new(),
        }
    }

    fn value_of(store: &MvccStore, key: &str) -> Option<Vec<u8>> {
        store
            .read()
            .expect("read")
            .range(&RangeRequestSpec {
                span: KeySpan { key: key.as_bytes(), range_end: &[] },
                revision: 0,
                limit: 0,
                returned: Returned::KeyValues,
            })
            .expect("range")
            .kvs
            .pop()
            .map(|kv| kv.value)
    }

    #[test]
    fn a_missing_key_has_version_zero_and_no_value() {
        let f = store();
        let absent = compare("k", CompareTarget::Version, CompareResult::Equal, TargetUnion::Version(0));
        let response =
            txn(&f.store, TxnRequest { compare: vec![absent], ..Default::default() }).expect("txn");
        assert!(response.succeeded);
        let empty_value =
            compare("k", CompareTarget::Value, CompareResult::Equal, TargetUnion::Value(vec![]));
        let response =
            txn(&f.store, TxnRequest { compare: vec![empty_value], ..Default::default() }).expect("txn");
        assert!(!response.succeeded, "a value compare on a missing key never holds");
    }

    #[test]
    fn reads_in_a_txn_see_its_earlier_writes_and_all_writes_share_a_revision() {
        let f = store();
        let before = put(&f.store, "other", "x").header.expect("header").revision;
        let request = TxnRequest {
            success: vec![
                op(Request::RequestPut(put_request("a", "1", 0))),
                op(Request::RequestPut(put_request("b", "2", 0))),
                op(Request::RequestRange(RangeRequest { key: "a".into(), ..Default::default() })),
            ],
            ..Default::default()
        };
        let response = txn(&f.store, request).expect("txn");
        assert_eq!(response.header.expect("header").revision, before + 1);
        let Some(Response::ResponseRange(range)) = &response.responses[2].response else { panic!("range") };
        assert_eq!(range.kvs[0].value, b"1");
        assert_eq!(range.kvs[0].mod_revision, before + 1);
    }

    #[test]
    fn a_read_only_txn_served_as_a_read_answers_as_through_the_log() {
        let f = store();
        put(&f.store, "a", "1");
        put(&f.store, "b", "2");
        let range = |key: &str, revision: i64| {
            op(Request::RequestRange(RangeRequest { key: key.into(), revision, ..Default::default() }))
        };
        let is_one =
            compare("a", CompareTarget::Value, CompareResult::Equal, TargetUnion::Value(b"1".to_vec()));
        let inner = TxnRequest {
            compare: vec![compare(
                "b",
                CompareTarget::Version,
                CompareResult::Greater,
                TargetUnion::Version(5),
            )],
            success: vec![range("a", 0)],
            failure: vec![range("b", 0), range("a", 2)],
        };
        let request = TxnRequest {
            compare: vec![is_one],
            success: vec![range("a", 0), op(Request::RequestTxn(inner))],
            failure: vec![range("b", 0)],
        };
        assert!(txn_is_read_only(&request));
        assert!(!txn_is_serializable(&request));
        let mut view = f.store.read().expect("read");
        let served = read_only_txn(&mut view, &request).expect("storage").expect("txn");
        drop(view);
        let through_the_log = txn(&f.store, request).expect("txn");
        assert_eq!(served, through_the_log);
        assert!(served.succeeded);
        assert_eq!(served.responses.len(), 2);
        // A read of a compacted or future revision is refused as through the log.
        let future = TxnRequest { success: vec![range("a", 99)], ..Default::default() };
        let mut view = f.store.read().expect("read");
        assert_eq!(read_only_txn(&mut view, &future).expect("storage"), Err(ApplyError::FutureRevision));
        // A write anywhere, in a branch not taken or nested, goes through the log.
        let nested_put = TxnRequest {
            failure: vec![op(Request::RequestTxn(TxnRequest {
                success: vec![op(Request::RequestPut(put_request("c", "3", 0)))],
                ..Default::default()
            }))],
            ..Default::default()
        };
        assert!(!txn_is_read_only(&nested_put));
        let serializable = TxnRequest {
            success: vec![op(Request::RequestRange(RangeRequest {
                key: "a".into(),
                serializable: true,
                ..Default::default()
            }))],
            ..Default::default()
        };
        assert!(txn_is_serializable(&serializable));
        // An empty op or a nested Txn asks for nothing serializable: its compares are judged
        // after a read barrier (etcd's rule).
        let empty_op = TxnRequest { success: vec![RequestOp { request: None }], ..serializable.clone() };
        assert!(!txn_is_serializable(&empty_op));
        let nested =
            TxnRequest { success: vec![op(Request::RequestTxn(serializable))], ..Default::default() };
        assert!(!txn_is_serializable(&nested));
    }

    #[test]
    fn a_refused_txn_writes_nothing() {
        let f = store();
        let request = TxnRequest {
            success: vec![
                op(Request::RequestPut(put_request("a", "1", 0))),
                op(Request::RequestPut(put_request("b", "2", 77))),
            ],
            ..Default::default()
        };
        assert_eq!(txn(&f.store, request), Err(ApplyError::LeaseNotFound));
        assert_eq!(value_of(&f.store, "a"), None);
    }

    #[test]
    fn nested_txns_choose_their_branch_on_the_state_before_the_outer_txn() {
        let f = store();
        let absent = compare("a", CompareTarget::Version, CompareResult::Equal, TargetUnion::Version(0));
        let inner = TxnRequest {
            compare: vec![absent],
            success: vec![op(Request::RequestPut(put_request("inner", "saw-a-absent", 0)))],
            failure: vec![op(Request::RequestPut(put_request("inner", "saw-a-present", 0)))],
        };
        let outer = TxnRequest {
            success: vec![op(Request::RequestPut(put_request("a", "1", 0))), op(Request::RequestTxn(inner))],
            ..Default::default()
        };
        txn(&f.store, outer).expect("txn");
        assert_eq!(value_of(&f.store, "inner").as_deref(), Some(b"saw-a-absent".as_slice()));
    }

    #[test]
    fn compaction_keeps_what_reads_at_the_compacted_revision_need() {
        let f = store();
        let r1 = put(&f.store, "k", "v1").header.expect("h").revision;
        let r2 = put(&f.store, "k", "v2").header.expect("h").revision;
        put(&f.store, "gone", "x");
        apply(
            &f.store,
            Command::DeleteRange(
                DeleteRangeRequest { key: "gone".into(), ..Default::default() }.encode_to_vec(),
            ),
        );
        let r3 = put(&f.store, "k", "v3").header.expect("h").revision;
        let compact_to =
            |revision| Command::Compact(CompactionRequest { revision, physical: true }.encode_to_vec());
        assert!(matches!(apply(&f.store, compact_to(r3)), Applied::Response(_)));
        let view = f.store.read().expect("read");
        let at = |revision| {
            view.range(&RangeRequestSpec {
                span: KeySpan { key: b"k", range_end: &[] },
                revision,
                limit: 0,
                returned: Returned::KeyValues,
            })
        };
        assert!(matches!(at(r1), Err(KvError::Compacted { .. })));
        assert!(matches!(at(r2), Err(KvError::Compacted { .. })));
        assert_eq!(at(r3).expect("read at the compacted revision").kvs[0].value, b"v3");
        assert_eq!(apply(&f.store, compact_to(r3)), Applied::Error(ApplyError::Compacted));
        assert_eq!(apply(&f.store, compact_to(r3 + 10)), Applied::Error(ApplyError::FutureRevision));
    }

    #[test]
    fn revoking_a_lease_deletes_its_keys_at_one_revision() {
        let f = store();
        let grant = LeaseGrantRequest { id: 5, ttl: 10 };
        assert!(matches!(apply(&f.store, Command::LeaseGrant(grant.encode_to_vec())), Applied::Response(_)));
        assert_eq!(
            apply(&f.store, Command::LeaseGrant(grant.encode_to_vec())),
            Applied::Error(ApplyError::LeaseExists)
        );
        apply(&f.store, Command::Put(put_request("a", "1", 5).encode_to_vec()));
        apply(&f.store, Command::Put(put_request("b", "2", 5).encode_to_vec()));
        // Re-put without the lease: detached, so it outlives the lease.
        apply(&f.store, Command::Put(put_request("b", "3", 0).encode_to_vec()));
        let before = f.store.read().expect("read").revision().expect("revision");
        apply(&f.store, Command::LeaseRevoke(LeaseRevokeRequest { id: 5 }.encode_to_vec()));
        assert_eq!(f.store.read().expect("read").revision().expect("revision"), before + 1);
        assert_eq!(value_of(&f.store, "a"), None);
        assert_eq!(value_of(&f.store, "b").as_deref(), Some(b"3".as_slice()));
        assert_eq!(
            apply(&f.store, Command::LeaseRevoke(LeaseRevokeRequest { id: 5 }.encode_to_vec())),
            Applied::Error(ApplyError::LeaseNotFound)
        );
    }

    #[test]
    fn the_space_alarm_refuses_writes_that_add_data_but_not_deletes() {
        let f = store();
        put(&f.store, "a", "1");
        let alarm = |action: AlarmAction| {
            Command::Alarm(
                AlarmRequest { action: action as i32, member_id: 9, alarm: AlarmType::Nospace as i32 }
                    .encode_to_vec(),
            )
        };
        apply(&f.store, alarm(AlarmAction::Activate));
        assert_eq!(
            apply(&f.store, Command::Put(put_request("b", "2", 0).encode_to_vec())),
            Applied::Error(ApplyError::NoSpace)
        );
        assert_eq!(
            apply(&f.store, Command::LeaseGrant(LeaseGrantRequest { id: 1, ttl: 5 }.encode_to_vec())),
            Applied::Error(ApplyError::NoSpace)
        );
        let delete = DeleteRangeRequest { key: "a".into(), ..Default::default() };
        assert!(matches!(
            apply(&f.store, Command::DeleteRange(delete.encode_to_vec())),
            Applied::Response(_)
        ));
        apply(&f.store, alarm(AlarmAction::Deactivate));
        assert!(matches!(
            apply(&f.store, Command::Put(put_request("b", "2", 0).encode_to_vec())),
            Applied::Response(_)
        ));
    }
}
