//! Client requests as the apply layer receives them from the log: protobuf bytes that any
//! client may have sent (the gRPC handlers pass a request's fields on as they came).
//!
//! Input: a sequence of `[kind: u8][chunk]`, the kind choosing the command (put, delete
//! range, txn, compaction, lease grant, lease revoke, alarm) and the chunk its encoded
//! request. Each is applied to two stores: one commits every command on its own, the other
//! applies them all in one batch, as a member applies many log entries at once. Properties:
//! - no request, however malformed, is a storage failure (which would stop the member);
//! - a refused request changes nothing;
//! - both stores answer every request alike and end with the same data (applying is
//!   deterministic and does not depend on how entries are batched, or members diverge);
//! - a Txn that only reads, served from a read view as the member serves it (not through
//!   the log), answers as it does through the log.

use consensus_node::kv::{Applying, MvccStore, apply_command, read_only_txn, txn_is_read_only};
use consensus_node::proto::etcdserverpb::TxnRequest;
use consensus_node::raft::types::{Applied, Command};
use prost::Message;

use crate::Fields;

/// The command a kind byte stands for, as the corpus writes them.
pub fn command(kind: u8, request: Vec<u8>) -> Command {
    match kind % 7 {
        0 => Command::Put(request),
        1 => Command::DeleteRange(request),
        2 => Command::Txn(request),
        3 => Command::Compact(request),
        4 => Command::LeaseGrant(request),
        5 => Command::LeaseRevoke(request),
        _ => Command::Alarm(request),
    }
}

pub fn commands(data: &[u8]) -> Vec<Command> {
    let mut fields = Fields::new(data);
    let mut commands = Vec::new();
    while !fields.is_empty() {
        let kind = fields.byte();
        commands.push(command(kind, fields.chunk().to_vec()));
    }
    commands
}

fn hash(store: &MvccStore) -> u32 {
    store.read().and_then(|view| view.hash_all()).expect("hashing the store")
}

fn apply(applying: &mut Applying<'_>, command: &Command) -> Applied {
    apply_command(applying, command).unwrap_or_else(|e| panic!("{command} was a storage failure: {e}"))
}

pub fn check(data: &[u8]) {
    let commands = commands(data);
    let dir = crate::scratch_dir();
    let one_by_one = MvccStore::open(&dir.path().join("one-by-one.db")).expect("a store");
    let batched = MvccStore::open(&dir.path().join("batched.db")).expect("a store");

    let mut answers = Vec::new();
    for command in &commands {
        let served_as_read = served_as_a_read(&one_by_one, command);
        let before = hash(&one_by_one);
        let mut applying = one_by_one.applying(false).expect("a write batch");
        let applied = apply(&mut applying, command);
        applying.finish().expect("committing");
        if let Applied::Error(error) = &applied {
            assert_eq!(hash(&one_by_one), before, "{command}, refused with {error:?}, changed the store");
        }
        if let Some(served) = served_as_read {
            assert_eq!(served, applied, "{command} answered otherwise served as a read");
            assert_eq!(hash(&one_by_one), before, "{command}, which only reads, changed the store");
        }
        answers.push(applied);
    }

    let mut applying = batched.applying(false).expect("a write batch");
    for (command, answer) in commands.iter().zip(&answers) {
        assert_eq!(&apply(&mut applying, command), answer, "{command} answered otherwise in a batch of many");
    }
    applying.finish().expect("committing");
    assert_eq!(hash(&batched), hash(&one_by_one), "the same commands left different data");
}

/// The answer to `command` served from a read view, when it is a Txn that only reads.
fn served_as_a_read(store: &MvccStore, command: &Command) -> Option<Applied> {
    let Command::Txn(bytes) = command else { return None };
    let request = TxnRequest::decode(bytes.as_slice()).ok().filter(txn_is_read_only)?;
    let mut view = store.read().expect("a read view");
    Some(
        match read_only_txn(&mut view, &request)
            .unwrap_or_else(|e| panic!("{command} was a storage failure: {e}"))
        {
            Ok(response) => Applied::Response(response.encode_to_vec()),
            Err(error) => Applied::Error(error),
        },
    )
}
