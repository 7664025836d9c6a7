//! etcd's errors: the gRPC code and message etcd sends for each, so clients written for
//! etcd (etcdctl, client libraries) recognise them and react as they do to etcd.

use serde::{Deserialize, Serialize};
use tonic::{Code, Status};

/// Errors decided by applying a command: identical on every member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ApplyError {
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRevision,
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    #[error("etcdserver: request is malformed: {0}")]
    Malformed(String),
}

impl From<ApplyError> for Status {
    fn from(e: ApplyError) -> Self {
        let code = match e {
            ApplyError::LeaseNotFound => Code::NotFound,
            ApplyError::LeaseExists => Code::FailedPrecondition,
            ApplyError::Compacted | ApplyError::FutureRevision => Code::OutOfRange,
            ApplyError::NoSpace => Code::ResourceExhausted,
            ApplyError::EmptyKey | ApplyError::KeyNotFound | ApplyError::Malformed(_) => {
                Code::InvalidArgument
            }
        };
        Status::new(code, e.to_string())
    }
}

/// Errors of serving a request, before or around the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ServerError {
    #[error("etcdserver: no leader")]
    NoLeader,
    #[error("etcdserver: leader changed")]
    LeaderChanged,
    #[error("etcdserver: request timed out")]
    Timeout,
    #[error("etcdserver: server stopped")]
    Stopped,
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRevision,
    #[error("etcdserver: member not found")]
    MemberNotFound,
    #[error("etcdserver: Peer URLs already exists")]
    PeerUrlExists,
    #[error("etcdserver: can only promote a learner member")]
    MemberNotLearner,
    #[error("etcdserver: can only promote a learner member which is in sync with leader")]
    LearnerNotReady,
    #[error("etcdserver: re-configuration failed due to not enough started members")]
    NotEnoughStartedMembers,
    #[error("etcdserver: bad leader transferee")]
    BadLeaderTransferee,
    #[error("etcdserver: rpc not supported for learner")]
    NotSupportedForLearner,
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    #[error("etcdserver: too many operations in txn request")]
    TooManyTxnOps,
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    #[error("etcdserver: invalid sort option")]
    InvalidSortOption,
    #[error("etcdserver: {0}")]
    Internal(String),
    // Appended after the variants above: these errors cross the peer port encoded by
    // position, so members of an older build still decode the ones they know.
    #[error("etcdserver: a voter set needs an odd number of members, not {0}")]
    VoterSetNotOdd(usize),
    #[error("etcdserver: the new voter set leaves out the leader {0:x}; move leadership first")]
    LeaderLeftOut(u64),
    #[error("etcdserver: {0:x} is not a member; add it as a learner first")]
    VoterNotMember(u64),
    /// A request forwarded to the leader failed on the way (the connection, not the leader's
    /// answer): its outcome is unknown, as with a timeout, and the message says what failed.
    #[error("etcdserver: forwarding to the leader failed: {0}")]
    ForwardFailed(String),
}

impl From<ServerError> for Status {
    fn from(e: ServerError) -> Self {
        use ServerError::*;
        let code = match e {
            NoLeader | LeaderChanged | Timeout | Stopped | NotSupportedForLearner | ForwardFailed(_) => {
                Code::Unavailable
            }
            Compacted | FutureRevision => Code::OutOfRange,
            MemberNotFound => Code::NotFound,
            PeerUrlExists
            | MemberNotLearner
            | LearnerNotReady
            | NotEnoughStartedMembers
            | BadLeaderTransferee
            | VoterSetNotOdd(_)
            | LeaderLeftOut(_)
            | VoterNotMember(_) => Code::FailedPrecondition,
            RequestTooLarge | TooManyTxnOps | DuplicateKey | LeaseTtlTooLarge | InvalidSortOption => {
                Code::InvalidArgument
            }
            Internal(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

impl From<crate::kv::KvError> for Status {
    fn from(e: crate::kv::KvError) -> Self {
        match e {
            crate::kv::KvError::Compacted { .. } => ServerError::Compacted.into(),
            crate::kv::KvError::FutureRevision => ServerError::FutureRevision.into(),
            crate::kv::KvError::Busy => ServerError::Timeout.into(),
            other => Status::internal(format!("etcdserver: {other}")),
        }
    }
}
