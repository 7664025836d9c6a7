//! The Raft log's write-ahead log: segment files of checksummed records in one directory.
//!
//! A record is `[body length: u32 LE][its complement: u32 LE][CRC-32 of body: u32 LE][body]`,
//! the body one of
//! - `1, index: u64 LE, payload`: a log entry (appending index `i` replaces entries >= `i`);
//! - `2, from: u64 LE`: entries >= `from` are removed;
//! - `3, upto: u64 LE`: entries <= `upto` are covered by a snapshot and removed.
//!
//! A dedicated writer thread owns the active segment and commits in groups: it takes every
//! request queued while it was busy, writes them all, calls `fdatasync` once, and only then
//! tells each caller its records are stored. Segments rotate past `segment_bytes` and are
//! named by a sequence number, so replay order is write order even when truncations make
//! later segments hold lower indexes.
//!
//! On open, a record cut short at the end of the last segment (a write the crash
//! interrupted, never acknowledged) is truncated away. Any other damaged record stops the
//! member with an error naming file and offset: silently dropping it could drop writes
//! that were acknowledged.
//!
//! Entries are also kept in memory for reads; snapshots bound how many (the log is purged
//! behind each one), so this costs about `snapshot_count` entries of memory.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const KIND_ENTRY: u8 = 1;
const KIND_TRUNCATE: u8 = 2;
const KIND_PURGE: u8 = 3;
const FRAME_HEADER: usize = 12;
/// Larger than any entry we write; a length beyond it is damage, not data.
const MAX_RECORD: u32 = 256 << 20;

/// Where the WAL reports fsync latency and bytes written (etcd's WAL metrics).
pub trait WalMetrics: Send + Sync {
    fn fsync(&self, took: Duration);
    fn wrote(&self, bytes: u64);
}

#[derive(Clone)]
pub struct WalOptions {
    pub segment_bytes: u64,
    pub metrics: Option<Arc<dyn WalMetrics>>,
}

impl Default for WalOptions {
    fn default() -> Self {
        Self { segment_bytes: 64 << 20, metrics: None }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("write-ahead log {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "write-ahead log {file} is corrupt at offset {offset}: {reason}. Acknowledged writes may be in or after \
         this record, so the member will not start: restore its data directory from a backup or replace the member"
    )]
    Corrupt { file: PathBuf, offset: u64, reason: String },
    #[error("write-ahead log {file}: entry {found} follows entry {previous}; entries are missing")]
    Gap { file: PathBuf, previous: u64, found: u64 },
    #[error("write-ahead log is closed")]
    Closed,
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> WalError + '_ {
    move |source| WalError::Io { path: path.to_owned(), source }
}

pub type Durable = Box<dyn FnOnce(io::Result<()>) + Send>;

/// Records to write, the highest entry index among them, and whom to tell when durable.
enum Request {
    Records(Vec<u8>, Option<u64>, Durable),
}

struct Segment {
    seq: u64,
    path: PathBuf,
    /// The highest entry index written into this segment.
    max_index: Option<u64>,
}

struct State {
    entries: BTreeMap<u64, Arc<Vec<u8>>>,
    /// Closed segments, oldest first (the writer owns the active one).
    closed: Vec<Segment>,
}

pub struct Wal {
    state: Arc<Mutex<State>>,
    sender: Option<Sender<Request>>,
    writer: Option<JoinHandle<()>>,
}

fn segment_name(seq: u64) -> String {
    format!("{seq:020}.wal")
}

fn frame(kind: u8, index: u64, payload: &[u8], out: &mut Vec<u8>) {
    let body_len = 1 + 8 + payload.len();
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&[kind]);
    hasher.update(&index.to_le_bytes());
    hasher.update(payload);
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&(!(body_len as u32)).to_le_bytes());
    out.extend_from_slice(&hasher.finalize().to_le_bytes());
    out.push(kind);
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(payload);
}

/// What replaying one record does to the in-memory entries.
fn replay(entries: &mut BTreeMap<u64, Arc<Vec<u8>>>, kind: u8, index: u64, payload: &[u8]) {
    match kind {
        KIND_ENTRY => {
            entries.split_off(&index);
            entries.insert(index, Arc::new(payload.to_vec()));
        }
        KIND_TRUNCATE => {
            entries.split_off(&index);
        }
        _ => {
            *entries = entries.split_off(&index.saturating_add(1));
        }
    }
}

struct Recovered {
    state: State,
    active: Segment,
    active_len: u64,
}

fn recover(dir: &Path) -> Result<Recovered, WalError> {
    fs::create_dir_all(dir).map_err(io_at(dir))?;
    let mut segments: Vec<Segment> = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_at(dir))? {
        let path = entry.map_err(io_at(dir))?.path();
        let seq = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".wal"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(seq) = seq {
            segments.push(Segment { seq, path, max_index: None });
        }
    }
    segments.sort_by_key(|s| s.seq);
    if segments.is_empty() {
        let path = dir.join(segment_name(0));
        File::create(&path).map_err(io_at(&path))?.sync_all().map_err(io_at(&path))?;
        crate::storage::hard_state::sync_dir(dir).map_err(io_at(dir))?;
        segments.push(Segment { seq: 0, path, max_index: None });
    }
    let mut entries = BTreeMap::new();
    let last = segments.len() - 1;
    let mut active_len = 0;
    for (i, segment) in segments.iter_mut().enumerate() {
        let mut bytes = Vec::new();
        File::open(&segment.path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(io_at(&segment.path))?;
        let mut offset = 0usize;
        while offset < bytes.len() {
            match parse_frame(&bytes[offset..]) {
                Ok((kind, index, payload, len)) => {
                    if kind == KIND_ENTRY
                        && let Some((&previous, _)) = entries.last_key_value()
                        && index > previous + 1
                    {
                        return Err(WalError::Gap { file: segment.path.clone(), previous, found: index });
                    }
                    replay(&mut entries, kind, index, payload);
                    if kind == KIND_ENTRY {
                        segment.max_index = segment.max_index.max(Some(index));
                    }
                    offset += len;
                }
                Err(FrameError::Incomplete) if i == last => {
                    tracing::warn!(
                        file = %segment.path.display(),
                        offset,
                        "write-ahead log ends in an incomplete record (a write cut short by a crash, never acknowledged); truncating it"
                    );
                    let file =
                        OpenOptions::new().write(true).open(&segment.path).map_err(io_at(&segment.path))?;
                    file.set_len(offset as u64).map_err(io_at(&segment.path))?;
                    file.sync_all().map_err(io_at(&segment.path))?;
                    bytes.truncate(offset);
                    break;
                }
                Err(e) => {
                    return Err(WalError::Corrupt {
                        file: segment.path.clone(),
                        offset: offset as u64,
                        reason: e.to_string(),
                    });
                }
            }
        }
        if i == last {
            active_len = bytes.len() as u64;
        }
    }
    let active = segments.pop().ok_or(WalError::Closed)?;
    Ok(Recovered { state: State { entries, closed: segments }, active, active_len })
}

#[derive(Debug, thiserror::Error)]
enum FrameError {
    #[error("record extends past the end of the file")]
    Incomplete,
    #[error("record length {0} is impossible")]
    BadLength(u32),
    #[error("checksum mismatch")]
    Checksum,
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
}

/// Parses the frame at the start of `bytes`: (kind, index, payload, frame length).
///
/// A frame whose header or body runs past the end of the file is `Incomplete`: the tail
/// of an interrupted write. A complete frame that fails its checksum is damage, wherever
/// it is, because a write the WAL acknowledged was written whole and fsynced. The length
/// is stored twice (plain and complemented) so a damaged length is seen as damage rather
/// than mistaken for a record cut short, which would truncate acknowledged records after it.
fn parse_frame(bytes: &[u8]) -> Result<(u8, u64, &[u8], usize), FrameError> {
    if bytes.len() < FRAME_HEADER {
        return Err(FrameError::Incomplete);
    }
    let word = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let (body_len, check, crc) = (word(0), word(4), word(8));
    if body_len != !check || !(9..=MAX_RECORD).contains(&body_len) {
        return Err(FrameError::BadLength(body_len));
    }
    let end = FRAME_HEADER + body_len as usize;
    if bytes.len() < end {
        return Err(FrameError::Incomplete);
    }
    let body = &bytes[FRAME_HEADER..end];
    if crc32fast::hash(body) != crc {
        return Err(FrameError::Checksum);
    }
    let kind = body[0];
    if !matches!(kind, KIND_ENTRY | KIND_TRUNCATE | KIND_PURGE) {
        return Err(FrameError::UnknownKind(kind));
    }
    let mut index = [0u8; 8];
    index.copy_from_slice(&body[1..9]);
    Ok((kind, u64::from_le_bytes(index), &body[9..], end))
}

impl Wal {
    /// Opens the WAL in `dir`, recovering it as described in the module documentation.
    pub fn open(dir: &Path, options: WalOptions) -> Result<Wal, WalError> {
        let Recovered { state, active, active_len } = recover(dir)?;
        let file = OpenOptions::new().append(true).open(&active.path).map_err(io_at(&active.path))?;
        let state = Arc::new(Mutex::new(state));
        let (sender, receiver) = mpsc::channel();
        let writer =
            Writer { dir: dir.to_owned(), state: state.clone(), active, file, len: active_len, options };
        let handle = std::thread::Builder::new()
            .name("wal-writer".into())
            .spawn(move || writer.run(receiver))
            .map_err(io_at(dir))?;
        Ok(Wal { state, sender: Some(sender), writer: Some(handle) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn submit(&self, records: Vec<u8>, first_entry: Option<u64>, on_durable: Durable) {
        let request = Request::Records(records, first_entry, on_durable);
        if let Some(sender) = &self.sender
            && let Err(mpsc::SendError(Request::Records(_, _, on_durable))) = sender.send(request)
        {
            on_durable(Err(io::Error::other(WalError::Closed)));
        }
    }

    /// Appends entries (consecutive indexes); `on_durable` runs once they are fsynced.
    /// They are readable at once, as openraft expects of submitted entries.
    pub fn append(&self, entries: Vec<(u64, Vec<u8>)>, on_durable: Durable) {
        let mut records = Vec::with_capacity(entries.iter().map(|(_, p)| p.len() + 17).sum());
        let max = entries.iter().map(|(i, _)| *i).max();
        {
            let mut state = self.lock();
            for (index, payload) in &entries {
                frame(KIND_ENTRY, *index, payload, &mut records);
            }
            for (index, payload) in entries {
                replay(&mut state.entries, KIND_ENTRY, index, &[]);
                state.entries.insert(index, Arc::new(payload));
            }
        }
        self.submit(records, max, on_durable);
    }

    /// Removes entries >= `from`; `on_durable` runs once that is fsynced.
    pub fn truncate_from(&self, from: u64, on_durable: Durable) {
        let mut record = Vec::new();
        frame(KIND_TRUNCATE, from, &[], &mut record);
        replay(&mut self.lock().entries, KIND_TRUNCATE, from, &[]);
        self.submit(record, None, on_durable);
    }

    /// Forgets entries <= `upto` (a snapshot covers them) and deletes the closed segments
    /// that hold nothing newer. The marker record is made durable with the next batch.
    pub fn purge_to(&self, upto: u64) -> Result<(), WalError> {
        let mut record = Vec::new();
        frame(KIND_PURGE, upto, &[], &mut record);
        let doomed: Vec<PathBuf> = {
            let mut state = self.lock();
            replay(&mut state.entries, KIND_PURGE, upto, &[]);
            // Only a prefix of segments goes, each holding nothing above `upto`: a truncate
            // record in a deleted segment then only ever concerned deleted segments.
            let keep_from = state.closed.iter().take_while(|s| s.max_index.is_none_or(|m| m <= upto)).count();
            state.closed.drain(..keep_from).map(|s| s.path).collect()
        };
        self.submit(record, None, Box::new(|_| {}));
        for path in doomed {
            fs::remove_file(&path).map_err(io_at(&path))?;
        }
        Ok(())
    }

    /// Entries with index in `[start, end)`.
    pub fn read_range(&self, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>, WalError> {
        if start >= end {
            return Ok(Vec::new());
        }
        Ok(self.lock().entries.range(start..end).map(|(i, p)| (*i, p.as_ref().clone())).collect())
    }

    pub fn first_index(&self) -> Option<u64> {
        self.lock().entries.keys().next().copied()
    }

    pub fn last_index(&self) -> Option<u64> {
        self.lock().entries.keys().next_back().copied()
    }

    /// Waits until everything submitted so far is durable.
    pub fn sync(&self) -> io::Result<()> {
        let (tx, rx) = mpsc::channel();
        self.submit(Vec::new(), None, Box::new(move |r| drop(tx.send(r))));
        rx.recv().map_err(|_| io::Error::other(WalError::Closed))?
    }

    /// Appends and waits until the entries are durable.
    pub fn append_blocking(&self, entries: Vec<(u64, Vec<u8>)>) -> io::Result<()> {
        let (tx, rx) = mpsc::channel();
        self.append(entries, Box::new(move |r| drop(tx.send(r))));
        rx.recv().map_err(|_| io::Error::other(WalError::Closed))?
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        // Closing the channel lets the writer finish what is queued and stop.
        self.sender.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

struct Writer {
    dir: PathBuf,
    state: Arc<Mutex<State>>,
    active: Segment,
    file: File,
    len: u64,
    options: WalOptions,
}

impl Writer {
    fn run(mut self, requests: Receiver<Request>) {
        while let Ok(first) = requests.recv() {
            let mut batch = vec![first];
            batch.extend(requests.try_iter());
            let result = self.write_batch(&mut batch);
            for Request::Records(_, _, on_durable) in batch {
                on_durable(match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                });
            }
        }
    }

    fn write_batch(&mut self, batch: &mut [Request]) -> io::Result<()> {
        let mut written = 0u64;
        for Request::Records(records, max_entry, _) in batch.iter_mut() {
            if records.is_empty() {
                continue;
            }
            if self.len >= self.options.segment_bytes {
                self.rotate()?;
            }
            self.file.write_all(records)?;
            self.active.max_index = self.active.max_index.max(*max_entry);
            self.len += records.len() as u64;
            written += records.len() as u64;
        }
        if written == 0 {
            return Ok(());
        }
        let started = Instant::now();
        self.file.sync_data()?;
        if let Some(metrics) = &self.options.metrics {
            metrics.fsync(started.elapsed());
            metrics.wrote(written);
        }
        Ok(())
    }

    /// Closes the active segment (it is already durable up to here) and starts a new one.
    fn rotate(&mut self) -> io::Result<()> {
        self.file.sync_data()?;
        let seq = self.active.seq + 1;
        let path = self.dir.join(segment_name(seq));
        let file = OpenOptions::new().create_new(true).append(true).open(&path)?;
        file.sync_all()?;
        crate::storage::hard_state::sync_dir(&self.dir)?;
        let closed = std::mem::replace(&mut self.active, Segment { seq, path, max_index: None });
        self.state.lock().unwrap_or_else(|p| p.into_inner()).closed.push(closed);
        self.file = file;
        self.len = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use proptest::prelude::*;

    use super::*;

    fn payload(i: u64) -> Vec<u8> {
        format!("entry-{i}-{}", "x".repeat((i % 7) as usize * 10)).into_bytes()
    }

    fn small_segments() -> WalOptions {
        WalOptions { segment_bytes: 256, metrics: None }
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

    fn append_range(wal: &Wal, range: std::ops::Range<u64>) {
        wal.append_blocking(range.map(|i| (i, payload(i))).collect()).expect("append");
    }

    #[test]
    fn entries_survive_reopen_across_segment_rotations() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let wal = Wal::open(dir.path(), small_segments()).expect("open");
            for i in 1..=60 {
                append_range(&wal, i..i + 1);
            }
        }
        assert!(segments(dir.path()).len() > 3, "segments rotated");
        let wal = Wal::open(dir.path(), small_segments()).expect("reopen");
        assert_eq!((wal.first_index(), wal.last_index()), (Some(1), Some(60)));
        let entries = wal.read_range(1, 61).expect("read");
        assert_eq!(entries, (1..=60).map(|i| (i, payload(i))).collect::<Vec<_>>());
    }

    #[test]
    fn truncated_entries_are_replaced_by_later_appends() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let wal = Wal::open(dir.path(), small_segments()).expect("open");
            append_range(&wal, 1..11);
            let (tx, rx) = mpsc::channel();
            wal.truncate_from(6, Box::new(move |r| drop(tx.send(r))));
            rx.recv().expect("callback").expect("truncate durable");
            wal.append_blocking(vec![(6, b"new six".to_vec())]).expect("append");
        }
        let wal = Wal::open(dir.path(), small_segments()).expect("reopen");
        assert_eq!(wal.last_index(), Some(6));
        assert_eq!(wal.read_range(6, 7).expect("read"), vec![(6, b"new six".to_vec())]);
    }

    #[test]
    fn purge_deletes_old_segments_and_reopen_starts_after_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let wal = Wal::open(dir.path(), small_segments()).expect("open");
            for i in 1..=60 {
                append_range(&wal, i..i + 1);
            }
            let before = segments(dir.path()).len();
            wal.purge_to(40).expect("purge");
            wal.sync().expect("sync");
            assert!(segments(dir.path()).len() < before, "no segment deleted");
            assert_eq!(wal.first_index(), Some(41));
        }
        let wal = Wal::open(dir.path(), small_segments()).expect("reopen");
        assert_eq!((wal.first_index(), wal.last_index()), (Some(41), Some(60)));
        // After a snapshot beyond the log, the next entry may start past a gap.
        wal.purge_to(100).expect("purge past the end");
        append_range(&wal, 101..103);
        drop(wal);
        let wal = Wal::open(dir.path(), small_segments()).expect("reopen after gap");
        assert_eq!((wal.first_index(), wal.last_index()), (Some(101), Some(102)));
    }

    #[test]
    fn a_torn_last_record_is_truncated_and_the_log_opens() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let wal = Wal::open(dir.path(), WalOptions::default()).expect("open");
            append_range(&wal, 1..21);
        }
        let last = segments(dir.path()).pop().expect("a segment");
        let full = fs::metadata(&last).expect("meta").len();
        // Cut the final record short, as a crash in the middle of a write would.
        OpenOptions::new().write(true).open(&last).expect("open").set_len(full - 5).expect("truncate");
        let wal = Wal::open(dir.path(), WalOptions::default()).expect("opens after a torn write");
        assert_eq!(wal.last_index(), Some(19));
        assert!(fs::metadata(&last).expect("meta").len() < full - 5, "the torn record was cut off the file");
        append_range(&wal, 20..22);
        drop(wal);
        // Half a frame header of garbage at the end is torn too.
        let mut file = OpenOptions::new().append(true).open(&last).expect("open");
        file.write_all(&[0x10, 0, 0]).expect("write");
        drop(file);
        let wal = Wal::open(dir.path(), WalOptions::default()).expect("opens");
        assert_eq!(wal.last_index(), Some(21));
    }

    /// Offset of the frame holding entry `index` in a segment written by `append_range`.
    fn offset_of(path: &Path, index: u64) -> u64 {
        let bytes = fs::read(path).expect("read");
        let mut offset = 0;
        while offset < bytes.len() {
            let (_, at, _, len) = parse_frame(&bytes[offset..]).expect("valid frame");
            if at == index {
                return offset as u64;
            }
            offset += len;
        }
        panic!("entry {index} not found");
    }

    #[test]
    fn a_flipped_bit_before_the_tail_refuses_to_open_naming_file_and_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let wal = Wal::open(dir.path(), WalOptions::default()).expect("open");
            append_range(&wal, 1..21);
        }
        let segment = segments(dir.path()).pop().expect("a segment");
        let offset = offset_of(&segment, 7);
        let mut bytes = fs::read(&segment).expect("read");
        bytes[offset as usize + FRAME_HEADER + 12] ^= 0x04;
        fs::write(&segment, &bytes).expect("write");
        let err =
            Wal::open(dir.path(), WalOptions::default()).err().expect("a corrupt record refuses to open");
        match &err {
            WalError::Corrupt { file, offset: at, .. } => {
                assert_eq!(file, &segment);
                assert_eq!(*at, offset);
            }
            other => panic!("unexpected error {other}"),
        }
        let message = err.to_string();
        assert!(
            message.contains(&segment.display().to_string()) && message.contains(&format!("offset {offset}")),
            "{message}"
        );
        // Nothing was truncated: the damaged file is left for an operator to inspect.
        assert_eq!(fs::read(&segment).expect("read"), bytes);
    }

    #[test]
    fn a_damaged_length_in_the_last_segment_is_corruption_not_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let wal = Wal::open(dir.path(), WalOptions::default()).expect("open");
            append_range(&wal, 1..21);
        }
        let segment = segments(dir.path()).pop().expect("a segment");
        let offset = offset_of(&segment, 5);
        let mut bytes = fs::read(&segment).expect("read");
        // A length that now points past the end of the file.
        bytes[offset as usize + 2] ^= 0x40;
        fs::write(&segment, &bytes).expect("write");
        assert!(matches!(
            Wal::open(dir.path(), WalOptions::default()),
            Err(WalError::Corrupt { offset: at, .. }) if at == offset
        ));
        assert_eq!(fs::read(&segment).expect("read"), bytes, "nothing truncated");
    }

    #[test]
    fn a_flipped_bit_in_an_older_segment_refuses_to_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let wal = Wal::open(dir.path(), small_segments()).expect("open");
            for i in 1..=40 {
                append_range(&wal, i..i + 1);
            }
        }
        let first = segments(dir.path()).remove(1);
        let mut bytes = fs::read(&first).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0x80;
        fs::write(&first, &bytes).expect("write");
        assert!(
            matches!(Wal::open(dir.path(), small_segments()), Err(WalError::Corrupt { file, .. }) if file == first)
        );
    }

    struct CountingMetrics {
        fsyncs: AtomicU64,
        bytes: AtomicU64,
    }

    impl WalMetrics for CountingMetrics {
        fn fsync(&self, _took: Duration) {
            self.fsyncs.fetch_add(1, Ordering::SeqCst);
        }
        fn wrote(&self, bytes: u64) {
            self.bytes.fetch_add(bytes, Ordering::SeqCst);
        }
    }

    #[test]
    fn concurrent_appends_share_fsyncs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let metrics = Arc::new(CountingMetrics { fsyncs: AtomicU64::new(0), bytes: AtomicU64::new(0) });
        let wal = Arc::new(
            Wal::open(dir.path(), WalOptions { segment_bytes: 64 << 20, metrics: Some(metrics.clone()) })
                .expect("open"),
        );
        // Indexes are handed out under a lock so appends stay consecutive, as Raft's are;
        // the fsyncs happen outside it, on the writer thread.
        let next = Arc::new(Mutex::new(1u64));
        let appends = 8 * 50;
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (wal, next) = (wal.clone(), next.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        let (tx, rx) = mpsc::channel();
                        {
                            let mut next = next.lock().expect("lock");
                            wal.append(vec![(*next, payload(*next))], Box::new(move |r| drop(tx.send(r))));
                            *next += 1;
                        }
                        rx.recv().expect("callback").expect("durable");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let fsyncs = metrics.fsyncs.load(Ordering::SeqCst);
        assert!(fsyncs < appends, "{fsyncs} fsyncs for {appends} appends: no group commit");
        assert!(metrics.bytes.load(Ordering::SeqCst) > 0);
        drop(wal);
        let wal = Wal::open(dir.path(), WalOptions::default()).expect("reopen");
        assert_eq!(wal.last_index(), Some(appends));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(u8),
        Truncate(u8),
        Purge(u8),
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1u8..5).prop_map(Op::Append),
            1 => (0u8..10).prop_map(Op::Truncate),
            1 => (0u8..10).prop_map(Op::Purge),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn matches_a_model_through_appends_truncations_purges_and_reopens(ops in proptest::collection::vec(op(), 1..30)) {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut wal = Wal::open(dir.path(), small_segments()).expect("open");
            let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
            let mut next = 1u64;
            for op in ops {
                match op {
                    Op::Append(n) => {
                        let entries: Vec<_> = (next..next + u64::from(n)).map(|i| (i, payload(i * 31 + next))).collect();
                        for (i, p) in &entries {
                            model.insert(*i, p.clone());
                        }
                        next += u64::from(n);
                        wal.append_blocking(entries).expect("append");
                    }
                    Op::Truncate(back) => {
                        let from = next.saturating_sub(u64::from(back)).max(model.keys().next().copied().unwrap_or(next));
                        model.split_off(&from);
                        next = from;
                        let (tx, rx) = mpsc::channel();
                        wal.truncate_from(from, Box::new(move |r| drop(tx.send(r))));
                        rx.recv().expect("callback").expect("durable");
                    }
                    Op::Purge(back) => {
                        let upto = next.saturating_sub(u64::from(back) + 1);
                        model = model.split_off(&(upto + 1));
                        wal.purge_to(upto).expect("purge");
                        wal.sync().expect("sync");
                    }
                    Op::Reopen => {
                        drop(wal);
                        wal = Wal::open(dir.path(), small_segments()).expect("reopen");
                    }
                }
                let all: Vec<_> = model.iter().map(|(i, p)| (*i, p.clone())).collect();
                prop_assert_eq!(wal.read_range(0, u64::MAX).expect("read"), all);
            }
        }
    }
}
