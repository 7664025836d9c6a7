//! The write-ahead log read back from damaged or hostile segment files.
//!
//! Input: `[segments: u8]`, then per segment (1 to 4) `[first index: u16 LE][chunk]`, each
//! written as the segment file named by that index. Properties:
//! - opening refuses or recovers, never panics;
//! - what it recovers is a run of consecutive indexes;
//! - a recovered log takes the next entry, and opening it again gives back exactly what was
//!   recovered plus that entry (a member that started once starts again, with its log).

use std::path::Path;

use consensus_node::storage::wal::{Wal, WalOptions};

use crate::Fields;

fn options() -> WalOptions {
    // Small segments, so that appending after recovery may start a new one; little held in
    // memory, so that entries are read back from the segments.
    WalOptions { segment_bytes: 4096, held_bytes: 64, metrics: None }
}

fn entries(wal: &Wal) -> Vec<(u64, Vec<u8>)> {
    let (Some(first), Some(last)) = (wal.first_index(), wal.last_index()) else { return Vec::new() };
    let read = wal.read_range(first, last.saturating_add(1)).expect("reading what the log says it holds");
    let indexes: Vec<u64> = read.iter().map(|(i, _)| *i).collect();
    let expected: Vec<u64> = (first..=last).collect();
    assert_eq!(indexes, expected, "the recovered log is not the run of indexes it reports");
    read
}

/// Writes the input's segments into `dir`, each named by its first index.
fn write_segments(dir: &Path, data: &[u8]) {
    let mut fields = Fields::new(data);
    let count = 1 + fields.byte() % 4;
    for _ in 0..count {
        let first = u64::from(fields.u16());
        let bytes = fields.chunk();
        std::fs::write(dir.join(format!("{first:016x}.wal")), bytes).expect("writing a segment");
    }
}

pub fn check(data: &[u8]) {
    let dir = crate::scratch_dir();
    write_segments(dir.path(), data);
    let Ok(wal) = Wal::open(dir.path(), options()) else { return };
    let mut expected = entries(&wal);
    if let Some(next) = wal.last_index().and_then(|l| l.checked_add(1)).filter(|n| *n < u64::MAX) {
        let payload = b"appended after recovery".to_vec();
        wal.append_blocking(vec![(next, payload.clone())]).expect("appending after the recovered log");
        expected.push((next, payload));
    }
    drop(wal);
    let again = Wal::open(dir.path(), options()).expect("opening a log this member opened and appended to");
    assert_eq!(entries(&again), expected, "a second opening recovered another log");
}
