//! The MVCC key-value store with etcd's semantics, persisted in redb.
//!
//! Every change gets the next global revision; each key carries the revision that created
//! it, the revision of its last change and its version (changes since creation). Reads see
//! the latest state or, until compacted, any earlier revision.
//!
//! Tables:
//! - `versions`: (key, revision) -> what the version written at that revision says besides
//!   its value (create revision, version, lease, where its value is), or a deletion
//!   (`version == 0`); the newest row of a key says whether it lives;
//! - `values`: (revision, n-th put of that revision) -> the value, in revision order, so that
//!   values are appended and a request that touches many keys rewrites only small rows;
//! - `leases`: lease id -> granted TTL; `lease_keys`: (lease id, key) for attached keys;
//! - `meta`: the current and compacted revisions, and the Raft state the apply layer keeps
//!   beside the data in the same transaction (applied log id, membership).

mod apply;
mod range;
mod store;
pub mod watch;

pub use apply::{alarms_of, apply_command, read_only_txn, txn_is_read_only, txn_is_serializable, txn_puts};
pub use range::{RangeSource, range, valid_sort};
pub use store::{
    Applying, KeySpan, KvError, KvHash, MvccStore, RangeRequestSpec, RangeResult, ReadView, Returned,
    WriteBatch,
};

/// The end of the range of keys that start with `prefix` (etcd's `range_end`).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff: to the end of the keyspace.
    vec![0]
}
