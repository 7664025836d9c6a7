//! Snapshot files as a member reads them: one sent by a leader, or given to `restore`.
//!
//! Input: a snapshot file's body; the harness appends its sha256, as a writer does, so the
//! fuzzer reaches past the checksum to the header and records (a checksum proves the file
//! is as its writer made it, not that the writer was ours). Properties:
//! - reading and restoring refuse or succeed, never panic or allocate what the file claims
//!   without having it;
//! - a store restored from a snapshot, dumped and restored again, holds the same data.

use consensus_node::kv::MvccStore;
use consensus_node::raft::state_machine::open_snapshot;
use sha2::{Digest, Sha256};

fn hash(store: &MvccStore) -> u32 {
    store.read().and_then(|view| view.hash_all()).expect("hashing the store")
}

pub fn check(data: &[u8]) {
    let dir = crate::scratch_dir();
    let path = dir.path().join("fuzzed.snap");
    let mut file = data.to_vec();
    file.extend_from_slice(&Sha256::digest(data));
    std::fs::write(&path, &file).expect("writing the snapshot");

    let Ok((_meta, mut records)) = open_snapshot(&path) else { return };
    let store = MvccStore::open(&dir.path().join("restored.db")).expect("a store");
    if store.restore(&mut records).is_err() {
        return;
    }
    let mut dumped = Vec::new();
    store.read().and_then(|view| view.dump(&mut dumped)).expect("dumping the restored store");
    let copy = MvccStore::open(&dir.path().join("copy.db")).expect("a store");
    copy.restore(&mut dumped.as_slice()).expect("restoring what a store dumped");
    assert_eq!(hash(&copy), hash(&store), "a dump restored to other data");
}
