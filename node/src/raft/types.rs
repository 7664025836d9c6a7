//! The Raft type configuration: what a log entry carries and who the members are.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A member as the cluster knows it: etcd's Member without the id (openraft keys members by id).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name, self.peer_urls.join(","))
    }
}

/// One replicated change, as the etcd request that asked for it (protobuf-encoded), so the
/// log holds exactly what clients sent and the apply layer decodes it once, deterministically.
///
/// The bytes are (de)serialized as bytes, not as a sequence of `u8`s one call each: postcard
/// writes both the same way (a length, then the bytes), so the WAL, snapshots and peers'
/// messages keep their format, and every encoding of an entry (WAL, replication, forwarding)
/// copies its request instead of visiting each byte.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Put(#[serde(with = "serde_bytes")] Vec<u8>),
    DeleteRange(#[serde(with = "serde_bytes")] Vec<u8>),
    Txn(#[serde(with = "serde_bytes")] Vec<u8>),
    Compact(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A grant whose id and TTL the proposing member has already decided.
    LeaseGrant(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A revoke, asked by a client or decided by the leader when the lease expired.
    LeaseRevoke(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Raises or clears an alarm (etcd's AlarmRequest), so every member refuses alike.
    Alarm(#[serde(with = "serde_bytes")] Vec<u8>),
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, bytes) = match self {
            Command::Put(b) => ("put", b),
            Command::DeleteRange(b) => ("delete_range", b),
            Command::Txn(b) => ("txn", b),
            Command::Compact(b) => ("compact", b),
            Command::LeaseGrant(b) => ("lease_grant", b),
            Command::LeaseRevoke(b) => ("lease_revoke", b),
            Command::Alarm(b) => ("alarm", b),
        };
        write!(f, "{name}({} bytes)", bytes.len())
    }
}

/// The outcome of applying one command: the protobuf-encoded etcd response, or the etcd
/// error the request gets (a failed request still consumed a log index, deterministically).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    Response(#[serde(with = "serde_bytes")] Vec<u8>),
    Error(crate::api::errors::ApplyError),
    /// Entries that carry no client request (blank, membership) answer nothing.
    Nothing,
}

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = u64,
        Node = Member,
);

pub type Raft = openraft::Raft<TypeConfig, super::state_machine::StateMachine>;
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
pub type Membership = openraft::Membership<u64, Member>;

#[cfg(test)]
mod tests {
    use super::*;

    /// `Command` and `Applied` as they were serialized before their bytes were marked as
    /// bytes: every `u8` on its own.
    #[derive(Serialize, Deserialize)]
    enum CommandAsSequence {
        Put(Vec<u8>),
        DeleteRange(Vec<u8>),
        Txn(Vec<u8>),
        Compact(Vec<u8>),
        LeaseGrant(Vec<u8>),
        LeaseRevoke(Vec<u8>),
        Alarm(Vec<u8>),
    }

    #[derive(Serialize, Deserialize)]
    enum AppliedAsSequence {
        Response(Vec<u8>),
    }

    #[test]
    fn entries_and_answers_keep_the_format_earlier_members_wrote_and_read() {
        // 300 bytes: a length past one varint byte.
        let bytes: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        let pairs = [
            (Command::Put(bytes.clone()), CommandAsSequence::Put(bytes.clone())),
            (Command::DeleteRange(bytes.clone()), CommandAsSequence::DeleteRange(bytes.clone())),
            (Command::Txn(bytes.clone()), CommandAsSequence::Txn(bytes.clone())),
            (Command::Compact(bytes.clone()), CommandAsSequence::Compact(bytes.clone())),
            (Command::LeaseGrant(bytes.clone()), CommandAsSequence::LeaseGrant(bytes.clone())),
            (Command::LeaseRevoke(bytes.clone()), CommandAsSequence::LeaseRevoke(bytes.clone())),
            (Command::Alarm(bytes.clone()), CommandAsSequence::Alarm(bytes.clone())),
        ];
        for (command, as_sequence) in pairs {
            let earlier = postcard::to_allocvec(&as_sequence).expect("encode");
            assert_eq!(postcard::to_allocvec(&command).expect("encode"), earlier, "{command}");
            assert_eq!(postcard::from_bytes::<Command>(&earlier).expect("decode"), command);
        }
        let earlier = postcard::to_allocvec(&AppliedAsSequence::Response(bytes.clone())).expect("encode");
        let applied = Applied::Response(bytes);
        assert_eq!(postcard::to_allocvec(&applied).expect("encode"), earlier);
        assert_eq!(postcard::from_bytes::<Applied>(&earlier).expect("decode"), applied);
    }
}
