use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};

use proptest::prelude::*;

use super::record::{self, Record};
use super::*;

fn payload(i: u64) -> Vec<u8> {
    format!("entry-{i}-{}", "x".repeat((i % 7) as usize * 10)).into_bytes()
}

fn small_segments() -> WalOptions {
    WalOptions { segment_bytes: 256, ..WalOptions::default() }
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .expect("wal dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    files.sort();
    files
}

fn append_range(wal: &Wal, range: std::ops::RangeInclusive<u64>) {
    wal.append_blocking(range.map(|i| (i, payload(i))).collect()).expect("append");
}

fn truncate(wal: &Wal, from: u64) {
    let (tx, rx) = mpsc::channel();
    wal.truncate_from(from, Box::new(move |r| drop(tx.send(r))));
    rx.recv().expect("callback").expect("truncation durable");
}

fn all(wal: &Wal) -> Vec<(u64, Vec<u8>)> {
    wal.read_range(0, u64::MAX).expect("read")
}

/// (offset, entry index if an entry) of every record in a segment.
fn frames(path: &Path) -> Vec<(u64, Option<u64>)> {
    let bytes = fs::read(path).expect("read");
    let mut at = 0;
    let mut out = Vec::new();
    while at < bytes.len() {
        let (record, len) = record::decode(&bytes[at..]).expect("valid frame");
        let index = match record {
            Record::Entry { index, .. } => Some(index),
            _ => None,
        };
        out.push((at as u64, index));
        at += len;
    }
    out
}

fn offset_of(path: &Path, index: u64) -> u64 {
    frames(path).into_iter().find(|(_, i)| *i == Some(index)).map(|(at, _)| at).expect("entry in segment")
}

fn flip(path: &Path, at: u64, mask: u8) -> Vec<u8> {
    let mut bytes = fs::read(path).expect("read");
    bytes[at as usize] ^= mask;
    fs::write(path, &bytes).expect("write");
    bytes
}

fn corrupt_at(result: Result<Wal, WalError>) -> (PathBuf, u64, String) {
    match result {
        Err(e @ WalError::Corrupt { .. }) => {
            let message = e.to_string();
            let WalError::Corrupt { file, offset, .. } = e else { unreachable!() };
            (file, offset, message)
        }
        Err(other) => panic!("expected Corrupt, got {other}"),
        Ok(_) => panic!("expected Corrupt, but the WAL opened"),
    }
}

#[test]
fn round_trip_across_segment_rotations() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let wal = Wal::open(dir.path(), small_segments()).expect("open");
        for i in 1..=40 {
            append_range(&wal, i..=i);
        }
        append_range(&wal, 41..=60);
        assert_eq!(
            wal.read_range(10, 13).expect("read"),
            (10..13).map(|i| (i, payload(i))).collect::<Vec<_>>()
        );
    }
    let files = segments(dir.path());
    assert!(files.len() > 3, "segments rotated: {files:?}");
    // Each segment is named by its first entry.
    for file in &files {
        let first_entry = frames(file).into_iter().find_map(|(_, i)| i).expect("an entry");
        assert_eq!(
            file.file_name().and_then(|n| n.to_str()),
            Some(format!("{first_entry:016x}.wal").as_str())
        );
    }
    let wal = Wal::open(dir.path(), small_segments()).expect("reopen");
    assert_eq!((wal.first_index(), wal.last_index()), (Some(1), Some(60)));
    assert_eq!(all(&wal), (1..=60).map(|i| (i, payload(i))).collect::<Vec<_>>());
    append_range(&wal, 61..=70);
    drop(wal);
    let wal = Wal::open(dir.path(), small_segments()).expect("reopen again");
    assert_eq!(all(&wal), (1..=70).map(|i| (i, payload(i))).collect::<Vec<_>>());
}

#[test]
fn truncate_then_reappend_same_indices_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let new = |i: u64| format!("new {i}").into_bytes();
    {
        let wal = Wal::open(dir.path(), small_segments()).expect("open");
        for i in 1..=60 {
            append_range(&wal, i..=i);
        }
        // Within the active segment.
        truncate(&wal, 58);
        wal.append_blocking(vec![(58, new(58))]).expect("append");
        // Back across several segments: a new segment starts at 20, later ones are deleted.
        truncate(&wal, 20);
        assert_eq!(wal.last_index(), Some(19));
        assert!(
            segments(dir.path())
                .iter()
                .all(|p| p.file_name().is_some_and(|n| n.to_str() <= Some("0000000000000014.wal")))
        );
        wal.append_blocking((20..=25).map(|i| (i, new(i))).collect()).expect("append");
    }
    let wal = Wal::open(dir.path(), small_segments()).expect("reopen");
    let expected: Vec<_> = (1..20).map(|i| (i, payload(i))).chain((20..=25).map(|i| (i, new(i)))).collect();
    assert_eq!(all(&wal), expected);
    // Everything gone, then a fresh start.
    truncate(&wal, 1);
    assert_eq!(wal.last_index(), None);
    append_range(&wal, 1..=3);
    drop(wal);
    let wal = Wal::open(dir.path(), small_segments()).expect("reopen");
    assert_eq!(all(&wal), (1..=3).map(|i| (i, payload(i))).collect::<Vec<_>>());
}

#[test]
fn purge_deletes_old_segments_and_reopen_reports_first_index() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let wal = Wal::open(dir.path(), small_segments()).expect("open");
        for i in 1..=60 {
            append_range(&wal, i..=i);
        }
        let before = segments(dir.path());
        wal.purge_to(40).expect("purge");
        assert_eq!(wal.first_index(), Some(41));
        wal.sync().expect("sync");
        let after = segments(dir.path());
        assert!(after.len() < before.len(), "no segment deleted");
        let active = before.last().expect("a segment");
        assert!(after.contains(active), "the active segment is kept");
        // Only segments whose entries are all <= 40 went: the first kept one holds <= 41.
        let first_kept = frames(&after[0]).into_iter().find_map(|(_, i)| i).expect("an entry");
        assert!(first_kept <= 41, "{first_kept}");
    }
    let wal = Wal::open(dir.path(), small_segments()).expect("reopen");
    assert_eq!((wal.first_index(), wal.last_index()), (Some(41), Some(60)));
    assert_eq!(all(&wal), (41..=60).map(|i| (i, payload(i))).collect::<Vec<_>>());
    // A snapshot beyond the log: the next entry follows the snapshot.
    wal.purge_to(100).expect("purge past the end");
    assert_eq!((wal.first_index(), wal.last_index()), (None, None));
    append_range(&wal, 101..=102);
    drop(wal);
    let wal = Wal::open(dir.path(), small_segments()).expect("reopen after the snapshot");
    assert_eq!((wal.first_index(), wal.last_index()), (Some(101), Some(102)));
    // Purged but empty: reopen still knows where the next entry goes.
    wal.purge_to(150).expect("purge");
    drop(wal);
    let wal = Wal::open(dir.path(), small_segments()).expect("reopen");
    assert_eq!(wal.first_index(), None);
    append_range(&wal, 151..=151);
    assert_eq!(wal.first_index(), Some(151));
}

#[test]
fn appends_that_do_not_follow_the_log_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(dir.path(), small_segments()).expect("open");
    append_range(&wal, 5..=6);
    let gap = wal.append_blocking(vec![(8, b"x".to_vec())]).expect_err("a gap is refused");
    assert_eq!(gap.kind(), io::ErrorKind::InvalidInput);
    let holes = wal.append_blocking(vec![(7, b"x".to_vec()), (9, b"y".to_vec())]).expect_err("refused");
    assert_eq!(holes.kind(), io::ErrorKind::InvalidInput);
    assert_eq!(wal.last_index(), Some(6));
    append_range(&wal, 7..=7);
    drop(wal);
    let wal = Wal::open(dir.path(), small_segments()).expect("reopen");
    assert_eq!((wal.first_index(), wal.last_index()), (Some(5), Some(7)));
}

#[test]
fn chopped_last_record_is_truncated_and_the_log_opens() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let wal = Wal::open(dir.path(), WalOptions::default()).expect("open");
        append_range(&wal, 1..=20);
    }
    let last = segments(dir.path()).pop().expect("a segment");
    let start_of_20 = offset_of(&last, 20);
    let full = fs::metadata(&last).expect("meta").len();
    OpenOptions::new().write(true).open(&last).expect("open").set_len(full - 5).expect("chop");
    let wal = Wal::open(dir.path(), WalOptions::default()).expect("opens after a torn write");
    assert_eq!(all(&wal), (1..=19).map(|i| (i, payload(i))).collect::<Vec<_>>());
    assert_eq!(fs::metadata(&last).expect("meta").len(), start_of_20, "truncated to the last good record");
    append_range(&wal, 20..=21);
    drop(wal);
    let wal = Wal::open(dir.path(), WalOptions::default()).expect("reopen");
    assert_eq!(wal.last_index(), Some(21));
}

#[test]
fn torn_garbage_after_the_last_record_is_truncated() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let wal = Wal::open(dir.path(), WalOptions::default()).expect("open");
        append_range(&wal, 1..=20);
    }
    let last = segments(dir.path()).pop().expect("a segment");
    let good = fs::metadata(&last).expect("meta").len();
    let mut whole = Vec::new();
    record::encode(&Record::Entry { index: 21, payload: &payload(21) }, &mut whole);
    let mut bad_checksum = whole.clone();
    *bad_checksum.last_mut().expect("bytes") ^= 0x20;
    let tails: [(&str, Vec<u8>); 4] = [
        ("half a frame header", whole[..4].to_vec()),
        ("a header and half the body", whole[..whole.len() / 2].to_vec()),
        ("a final record failing its checksum", bad_checksum),
        ("a zero-filled tail", vec![0; 4096]),
    ];
    for (what, tail) in tails {
        let mut file = OpenOptions::new().append(true).open(&last).expect("open");
        file.write_all(&tail).expect("write");
        drop(file);
        let wal = Wal::open(dir.path(), WalOptions::default()).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(wal.last_index(), Some(20), "{what}");
        assert_eq!(all(&wal).len(), 20, "{what}");
        drop(wal);
        assert_eq!(fs::metadata(&last).expect("meta").len(), good, "{what}: truncated");
    }
}

#[test]
fn flipped_bit_in_an_earlier_record_is_corrupt_at_its_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let wal = Wal::open(dir.path(), WalOptions::default()).expect("open");
        append_range(&wal, 1..=20);
    }
    let segment = segments(dir.path()).pop().expect("a segment");
    let offset = offset_of(&segment, 7);
    let bytes = flip(&segment, offset + record::FRAME_HEADER as u64 + 10, 0x04);
    let (file, at, message) = corrupt_at(Wal::open(dir.path(), WalOptions::default()));
    assert_eq!((file, at), (segment.clone(), offset));
    assert!(message.contains(&segment.display().to_string()), "{message}");
    assert!(message.contains(&format!("offset {offset}")), "{message}");
    assert!(
        message.contains("restore its data directory") && message.contains("replace the member"),
        "{message}"
    );
    assert_eq!(fs::read(&segment).expect("read"), bytes, "nothing truncated");
}

#[test]
fn damaged_length_in_the_last_segment_is_corrupt_not_a_torn_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let wal = Wal::open(dir.path(), WalOptions::default()).expect("open");
        append_range(&wal, 1..=20);
    }
    let segment = segments(dir.path()).pop().expect("a segment");
    let offset = offset_of(&segment, 5);
    // The length now points past the end of the file, as a torn write's would.
    let bytes = flip(&segment, offset + 2, 0x40);
    let (file, at, _) = corrupt_at(Wal::open(dir.path(), WalOptions::default()));
    assert_eq!((file, at), (segment.clone(), offset));
    assert_eq!(fs::read(&segment).expect("read"), bytes, "nothing truncated");
}

#[test]
fn flipped_bit_in_a_non_last_segment_is_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let wal = Wal::open(dir.path(), small_segments()).expect("open");
        for i in 1..=40 {
            append_range(&wal, i..=i);
        }
    }
    let files = segments(dir.path());
    assert!(files.len() > 2);
    // The last byte of its last record: in the last segment this would look torn.
    let victim = files[1].clone();
    let last_record = frames(&victim).last().expect("a record").0;
    let len = fs::metadata(&victim).expect("meta").len();
    let bytes = flip(&victim, len - 1, 0x80);
    let (file, at, _) = corrupt_at(Wal::open(dir.path(), small_segments()));
    assert_eq!((file, at), (victim.clone(), last_record));
    assert_eq!(fs::read(&victim).expect("read"), bytes, "nothing truncated");
}

#[test]
fn a_missing_segment_is_a_gap() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let wal = Wal::open(dir.path(), small_segments()).expect("open");
        for i in 1..=40 {
            append_range(&wal, i..=i);
        }
    }
    let files = segments(dir.path());
    fs::remove_file(&files[2]).expect("remove");
    match Wal::open(dir.path(), small_segments()) {
        Err(WalError::Gap { file, .. }) => assert_eq!(file, files[3]),
        Err(other) => panic!("expected a gap, got {other}"),
        Ok(_) => panic!("expected a gap, but the WAL opened"),
    }
}

/// Counts fsyncs and bytes. The first fsync holds the writer until `open` is called, so
/// requests queue up behind it exactly as they do behind a slow disk.
struct GatedMetrics {
    fsyncs: AtomicU64,
    bytes: AtomicU64,
    open: Mutex<bool>,
    opened: Condvar,
}

impl GatedMetrics {
    fn closed() -> Arc<Self> {
        Arc::new(GatedMetrics {
            fsyncs: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            open: Mutex::new(false),
            opened: Condvar::new(),
        })
    }

    fn open(&self) {
        *self.open.lock().expect("lock") = true;
        self.opened.notify_all();
    }
}

impl WalMetrics for GatedMetrics {
    fn fsync(&self, _took: Duration) {
        self.fsyncs.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.lock().expect("lock");
        while !*open {
            open = self.opened.wait(open).expect("wait");
        }
    }

    fn wrote(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::SeqCst);
    }
}

#[test]
fn concurrent_appends_share_fsyncs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics = GatedMetrics::closed();
    let options = WalOptions { metrics: Some(metrics.clone()), ..WalOptions::default() };
    let wal = Arc::new(Wal::open(dir.path(), options).expect("open"));
    const THREADS: u64 = 8;
    const APPENDS: u64 = 50;
    // Indexes are handed out under a lock so appends stay consecutive, as Raft's are.
    let next = Arc::new(Mutex::new((1u64, 0u64)));
    let (tx, rx) = mpsc::channel();
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (wal, next, tx) = (wal.clone(), next.clone(), tx.clone());
            std::thread::spawn(move || {
                for k in 0..APPENDS {
                    let mut next = next.lock().expect("lock");
                    let (index, call) = *next;
                    let count = 1 + (t + k) % 3;
                    let tx = tx.clone();
                    let entries = (index..index + count).map(|i| (i, payload(i))).collect();
                    wal.append(entries, Box::new(move |r| drop(tx.send((call, r)))));
                    *next = (index + count, call + 1);
                }
            })
        })
        .collect();
    drop(tx);
    for t in threads {
        t.join().expect("thread");
    }
    metrics.open();
    let results: Vec<_> = rx.iter().collect();
    let calls = THREADS * APPENDS;
    assert_eq!(results.len() as u64, calls);
    assert!(results.iter().all(|(_, r)| r.is_ok()), "every append durable");
    assert!(results.windows(2).all(|w| w[0].0 < w[1].0), "callbacks run in queue order");
    let fsyncs = metrics.fsyncs.load(Ordering::SeqCst);
    assert!(fsyncs < calls, "{fsyncs} fsyncs for {calls} appends: no group commit");
    assert!(fsyncs <= 2, "everything queued behind the first fsync shares the second: {fsyncs}");
    let last = next.lock().expect("lock").0 - 1;
    drop(Arc::try_unwrap(wal).ok().expect("sole owner"));
    let on_disk: u64 = segments(dir.path()).iter().map(|p| fs::metadata(p).expect("meta").len()).sum();
    assert_eq!(metrics.bytes.load(Ordering::SeqCst), on_disk, "bytes reported = bytes written");
    let wal = Wal::open(dir.path(), WalOptions::default()).expect("reopen");
    assert_eq!(all(&wal), (1..=last).map(|i| (i, payload(i))).collect::<Vec<_>>());
}

#[derive(Debug, Clone)]
enum Step {
    Append { count: u8, size: u8 },
    Truncate { back: u8 },
    Purge { back: u8 },
    PurgeAhead { ahead: u8 },
    Reopen,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (1u8..6, 0u8..60).prop_map(|(count, size)| Step::Append { count, size }),
        2 => (0u8..12).prop_map(|back| Step::Truncate { back }),
        1 => (0u8..12).prop_map(|back| Step::Purge { back }),
        1 => (1u8..4).prop_map(|ahead| Step::PurgeAhead { ahead }),
        1 => Just(Step::Reopen),
    ]
}

/// The log as a map, with the same rule for where the next entry goes.
#[derive(Default)]
struct Model {
    entries: BTreeMap<u64, Vec<u8>>,
    purged: Option<u64>,
    /// Where to start when the log is empty and was never purged (any index is accepted).
    start: u64,
}

impl Model {
    fn next(&self) -> u64 {
        match (self.entries.last_key_value(), self.purged) {
            (Some((last, _)), _) => last + 1,
            (None, Some(purged)) => purged + 1,
            (None, None) => self.start,
        }
    }

    fn check(&self, wal: &Wal) -> Result<(), TestCaseError> {
        let expected: Vec<_> = self.entries.iter().map(|(i, p)| (*i, p.clone())).collect();
        prop_assert_eq!(all(wal), expected);
        prop_assert_eq!(wal.first_index(), self.entries.keys().next().copied());
        prop_assert_eq!(wal.last_index(), self.entries.keys().next_back().copied());
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_match_a_model_across_reopens(
        ops in proptest::collection::vec(step(), 1..40),
        segment_bytes in prop_oneof![Just(1u64), Just(100), Just(300), Just(4096)],
        held_bytes in prop_oneof![Just(0u64), Just(200), Just(u64::MAX)],
    ) {
        run_steps(ops, segment_bytes, held_bytes)?;
    }
}

/// Applies `ops` to a WAL and to the model, comparing them after each and after a reopen.
fn run_steps(ops: Vec<Step>, segment_bytes: u64, held_bytes: u64) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = WalOptions { segment_bytes, held_bytes, metrics: None };
    let mut wal = Wal::open(dir.path(), options.clone()).expect("open");
    let mut model = Model { start: 1, ..Model::default() };
    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Step::Append { count, size } => {
                let first = model.next();
                let entries: Vec<_> = (first..first + u64::from(count))
                    .map(|i| (i, format!("{i}@{step}:{}", "p".repeat(usize::from(size))).into_bytes()))
                    .collect();
                model.entries.extend(entries.iter().cloned());
                wal.append_blocking(entries).expect("append");
            }
            Step::Truncate { back } => {
                let from = model.next().saturating_sub(u64::from(back));
                model.entries.split_off(&from);
                model.start = from;
                truncate(&wal, from);
            }
            Step::Purge { back } => {
                let Some(upto) = model.next().checked_sub(1 + u64::from(back)) else { continue };
                model.entries = model.entries.split_off(&(upto + 1));
                model.purged = model.purged.max(Some(upto));
                wal.purge_to(upto).expect("purge");
                wal.sync().expect("sync");
            }
            Step::PurgeAhead { ahead } => {
                let upto = model.next() + u64::from(ahead) - 1;
                model.entries.clear();
                model.purged = model.purged.max(Some(upto));
                wal.purge_to(upto).expect("purge");
            }
            Step::Reopen => {
                drop(wal);
                wal = Wal::open(dir.path(), options.clone()).expect("reopen");
            }
        }
        model.check(&wal)?;
    }
    drop(wal);
    let wal = Wal::open(dir.path(), options).expect("final reopen");
    model.check(&wal)?;
    // The next index survived too.
    let next = model.next();
    wal.append_blocking(vec![(next, b"after".to_vec())]).expect("append after reopen");
    Ok(())
}

/// Found by the property test: the segments before a truncation point are purged away,
/// so recovery starts from a segment whose header stands in for them.
#[test]
fn truncation_then_purge_of_the_segments_before_it_reopens() {
    use Step::*;
    let mut ops: Vec<Step> = (0..9).map(|_| Append { count: 1, size: 0 }).collect();
    ops.extend([
        Append { count: 3, size: 5 },
        Append { count: 3, size: 7 },
        Purge { back: 0 },
        Append { count: 2, size: 58 },
        Append { count: 2, size: 0 },
        Truncate { back: 2 },
        Append { count: 1, size: 0 },
        PurgeAhead { ahead: 1 },
    ]);
    run_steps(ops, 300, u64::MAX).expect("matches the model");
}

#[test]
fn every_cut_of_the_last_segment_recovers_the_complete_records() {
    let source = tempfile::tempdir().expect("tempdir");
    {
        let wal = Wal::open(source.path(), small_segments()).expect("open");
        for i in 1..=30 {
            append_range(&wal, i..=i);
        }
    }
    let files = segments(source.path());
    let last = files.last().expect("a segment");
    let bytes = fs::read(last).expect("read");
    let complete = frames(last);
    let before: Vec<u64> = frames(&files[files.len() - 2]).into_iter().filter_map(|(_, i)| i).collect();
    for cut in 0..bytes.len() {
        let dir = tempfile::tempdir().expect("tempdir");
        for file in &files[..files.len() - 1] {
            fs::copy(file, dir.path().join(file.file_name().expect("name"))).expect("copy");
        }
        let name = last.file_name().expect("name");
        fs::write(dir.path().join(name), &bytes[..cut]).expect("write");
        let wal = Wal::open(dir.path(), small_segments()).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        // The entries whose records end at or before the cut survive.
        let survivors =
            complete.iter().zip(complete.iter().skip(1).map(|(at, _)| *at).chain([bytes.len() as u64]));
        let expected = survivors
            .filter(|((_, index), end)| index.is_some() && *end <= cut as u64)
            .filter_map(|((_, index), _)| *index)
            .last()
            .or(before.last().copied());
        assert_eq!(wal.last_index(), expected, "cut at {cut}");
        assert_eq!(wal.first_index(), Some(1), "cut at {cut}");
    }
}

fn limited(held_bytes: u64) -> WalOptions {
    WalOptions { segment_bytes: 4 << 20, held_bytes, metrics: None }
}

fn big_payload(i: u64) -> Vec<u8> {
    let mut payload = vec![(i % 251) as u8; 128 << 10];
    payload[..8].copy_from_slice(&i.to_le_bytes());
    payload
}

/// A follower far behind, or 5,000 large entries kept behind a snapshot, must not hold the
/// whole log in memory: past the limit, entries are read back from their segments.
#[test]
fn entries_past_the_memory_limit_are_read_back_from_their_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limit = 1 << 20;
    let expected: Vec<_> = (1..=64).map(|i| (i, big_payload(i))).collect();
    {
        let wal = Wal::open(dir.path(), limited(limit)).expect("open");
        for chunk in expected.chunks(4) {
            wal.append_blocking(chunk.to_vec()).expect("append");
        }
        // 8 MiB appended, all durable.
        assert!(wal.held_bytes() <= limit, "{} bytes held, the limit is {limit}", wal.held_bytes());
        assert!(wal.held_bytes() > 0, "the newest entries are held");
        assert_eq!(all(&wal), expected);
        assert_eq!(wal.read_range(3, 5).expect("read"), expected[2..4].to_vec());
        // Purging deletes segments that entries were read from; the rest still read.
        wal.purge_to(40).expect("purge");
        wal.sync().expect("sync");
        assert!(segments(dir.path()).len() < 3, "purged segments deleted: {:?}", segments(dir.path()));
        assert_eq!(all(&wal), expected[40..].to_vec());
    }
    let wal = Wal::open(dir.path(), limited(limit)).expect("reopen");
    assert!(
        wal.held_bytes() <= limit,
        "{} bytes held after recovery, the limit is {limit}",
        wal.held_bytes()
    );
    assert_eq!(all(&wal), expected[40..].to_vec());
}

/// The writer reports where an append's records went only after they are durable. By then
/// the entries may have been truncated and appended again: the report must not be taken
/// for the new entries, or they would be read back as the old ones.
#[test]
fn a_report_for_entries_truncated_and_appended_again_meanwhile_is_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics = GatedMetrics::closed();
    let options = WalOptions { held_bytes: 0, metrics: Some(metrics.clone()), ..WalOptions::default() };
    let wal = Wal::open(dir.path(), options).expect("open");
    let old: Vec<_> = (1..=5).map(|i| (i, format!("old {i}").into_bytes())).collect();
    let (tx, rx) = mpsc::channel();
    let durable = move |tx: mpsc::Sender<io::Result<()>>| -> Durable { Box::new(move |r| drop(tx.send(r))) };
    wal.append(old.clone(), durable(tx.clone()));
    // The writer has written the first append and waits in its fsync.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while metrics.fsyncs.load(Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < deadline, "the writer never reached its fsync");
        std::thread::sleep(Duration::from_millis(1));
    }
    wal.truncate_from(3, durable(tx.clone()));
    let new: Vec<_> = (3..=5).map(|i| (i, format!("new {i}").into_bytes())).collect();
    wal.append(new.clone(), durable(tx));
    metrics.open();
    for _ in 0..3 {
        rx.recv().expect("callback").expect("durable");
    }
    assert_eq!(wal.held_bytes(), 0, "everything durable is let go with a limit of 0");
    let expected: Vec<_> = old[..2].iter().chain(&new).cloned().collect();
    assert_eq!(all(&wal), expected);
}

/// A record damaged on disk after its payload was let go is reported, never returned.
#[test]
fn a_damaged_record_read_back_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(dir.path(), limited(0)).expect("open");
    append_range(&wal, 1..=5);
    let segment = segments(dir.path()).pop().expect("a segment");
    let record_at = offset_of(&segment, 3);
    let at = record_at + record::FRAME_HEADER as u64 + 8;
    let file = OpenOptions::new().write(true).open(&segment).expect("open segment");
    std::os::unix::fs::FileExt::write_all_at(&file, b"X", at).expect("damage the payload");
    assert_eq!(
        wal.read_range(1, 3).expect("undamaged entries read"),
        (1..=2).map(|i| (i, payload(i))).collect::<Vec<_>>()
    );
    match wal.read_range(1, 6) {
        Err(WalError::Corrupt { file, offset, reason }) => {
            assert_eq!(file, segment);
            assert_eq!(offset, record_at);
            assert!(reason.contains("entry 3"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

/// Indexes at the top of the range: reading back the last one, and purging everything.
#[test]
fn the_highest_indexes_read_back_and_purge() {
    let dir = tempfile::tempdir().expect("tempdir");
    let last = u64::MAX - 1;
    {
        let wal = Wal::open(dir.path(), limited(0)).expect("open");
        wal.append_blocking(vec![(last - 1, b"a".to_vec()), (last, b"b".to_vec())]).expect("append");
        assert_eq!(wal.held_bytes(), 0, "both durable and let go");
        assert_eq!(all(&wal), vec![(last - 1, b"a".to_vec()), (last, b"b".to_vec())]);
    }
    let wal = Wal::open(dir.path(), limited(0)).expect("reopen");
    assert_eq!(all(&wal), vec![(last - 1, b"a".to_vec()), (last, b"b".to_vec())]);
    wal.purge_to(u64::MAX).expect("purge");
    wal.sync().expect("sync");
    assert_eq!(wal.first_index(), None);
    drop(wal);
    let wal = Wal::open(dir.path(), limited(0)).expect("reopen after purging everything");
    assert_eq!(wal.first_index(), None);
}
