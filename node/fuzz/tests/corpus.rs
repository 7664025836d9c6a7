//! Every input in `corpus/<target>/` (the seeds and what fuzzing kept) and in
//! `regressions/<target>/` (inputs that once failed, kept after the fix) through the same
//! checks the fuzz targets run.

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut replayed = 0;
    for kind in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(kind).join(target)) else { continue };
        for entry in entries {
            let path = entry.expect("a corpus entry").path();
            let input = std::fs::read(&path).expect("a corpus file");
            let outcome = std::panic::catch_unwind(|| check(&input));
            assert!(outcome.is_ok(), "{} failed the {target} check", path.display());
            replayed += 1;
        }
    }
    assert!(replayed > 0, "no corpus for the {target} target: make fuzz-seeds");
}

#[test]
fn wal_corpus() {
    replay("wal", consensus_node_fuzz::wal::check);
}

#[test]
fn apply_corpus() {
    replay("apply", consensus_node_fuzz::apply::check);
}

#[test]
fn snapshot_corpus() {
    replay("snapshot", consensus_node_fuzz::snapshot::check);
}

#[test]
fn authority_corpus() {
    replay("authority", consensus_node_fuzz::authority::check);
}
