//! The Raft log's write-ahead log: segment files of checksummed records in one directory.
//!
//! **Format.** Each segment is named by the first index it may contain
//! (`{index:016x}.wal`, e.g. `0000000000000001.wal`) and holds frames
//! `[len: u32 LE][crc32(kind ‖ body): u32 LE][kind: u8][body]` (see [`record`]): a segment
//! header, then entry, truncate and purge records. A new segment starts once the active
//! one has reached [`WalOptions::segment_bytes`]. A truncation that reaches back before the
//! active segment's first index starts a new segment named by the truncation point and
//! deletes the segments it supersedes, so names always sort in write order.
//!
//! **Durability.** A dedicated writer thread owns the active segment and commits in
//! groups: it takes every request queued while it was busy (appends, truncations, purges),
//! writes them all, calls `fdatasync` once, and only then calls each request's callback,
//! in queue order (a segment closed mid-group is synced before the next is created).
//! Creating a segment also fsyncs the directory. Superseded segments are deleted before
//! the truncation's new segment exists, so a crash in between recovers an older prefix of
//! the log: entries >= the (unacknowledged) truncation point may be lost early, which
//! Raft tolerates because it only truncates uncommitted entries. After an I/O error the
//! writer refuses all further writes (a failed fsync cannot be retried safely): the member
//! must restart, and recovery then trusts only what is on disk.
//!
//! **Recovery.** [`Wal::open`] replays the segments in order. If the last segment ends in
//! a torn write — a record running past the end of the file, a final record failing its
//! checksum with nothing after it, or a zero-filled tail — and no valid record follows,
//! the tail was never acknowledged: it is truncated away (with a warning naming file and
//! offset). Any other damaged record, missing segment or index gap refuses to open: it may
//! hold acknowledged writes, so the data directory must be restored or the member replaced.
//!
//! **Memory.** All live entry payloads are also kept in memory (v1 simplicity): reads never
//! touch the disk, and entries are readable as soon as `append` returns, as openraft
//! expects. Snapshots bound the size, since the log is purged behind each one.

mod record;
mod segment;
mod writer;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use record::Record;
use segment::{SegmentFile, io_at};
use writer::{LogState, Op, Request, Writer};

/// Where the WAL reports fsync latency and bytes written (etcd's WAL metrics).
pub trait WalMetrics: Send + Sync {
    /// Called after each `fdatasync` of a segment with exactly the time it took.
    fn fsync(&self, took: Duration);
    /// Called once per group commit with the bytes written to segment files.
    fn wrote(&self, bytes: u64);
}

#[derive(Clone)]
pub struct WalOptions {
    /// A new segment starts once the active one has reached this size.
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
    #[error(
        "write-ahead log {file}: expected entry {expected} next but found {found}; entries are missing (a segment \
         file was lost?), so the member will not start: restore its data directory from a backup or replace the member"
    )]
    Gap { file: PathBuf, expected: u64, found: u64 },
    #[error("write-ahead log is closed")]
    Closed,
}

/// Called once the request (and everything queued before it) is durable, or with the error.
pub type Durable = Box<dyn FnOnce(io::Result<()>) + Send>;

/// The live entries (consecutive indexes) and the purge point.
#[derive(Default)]
struct MemLog {
    /// Index of `entries[0]`; meaningless when `entries` is empty.
    start: u64,
    entries: VecDeque<Vec<u8>>,
    purged: Option<u64>,
}

impl MemLog {
    fn first(&self) -> Option<u64> {
        (!self.entries.is_empty()).then_some(self.start)
    }

    fn last(&self) -> Option<u64> {
        (!self.entries.is_empty()).then(|| self.start + (self.entries.len() as u64 - 1))
    }

    /// The index the next append must have; `None` when any index may start the log.
    fn next(&self) -> Option<u64> {
        match self.last() {
            Some(last) => Some(last + 1),
            None => self.purged.map(|p| p.saturating_add(1)),
        }
    }

    fn state(&self) -> LogState {
        LogState { purged: self.purged, prev_last: self.last() }
    }

    /// Adds the entry after the last one (or starts the log at `index`).
    fn push(&mut self, index: u64, payload: Vec<u8>) {
        if self.entries.is_empty() {
            self.start = index;
        }
        self.entries.push_back(payload);
    }

    fn truncate(&mut self, from: u64) {
        if from <= self.start {
            self.entries.clear();
        } else if let Ok(keep) = usize::try_from(from - self.start) {
            self.entries.truncate(keep);
        }
    }

    fn purge(&mut self, upto: u64) {
        self.purged = self.purged.max(Some(upto));
        let Some(last) = self.last() else { return };
        if upto >= last {
            self.entries.clear();
        } else if upto >= self.start {
            // upto - start + 1 <= len, which is a usize.
            let drop = (upto - self.start + 1) as usize;
            self.entries.drain(..drop);
            self.start = upto + 1;
        }
    }
}

/// Rebuilds the log from the segments' records, checking they form one consistent history.
#[derive(Default)]
struct Replay {
    log: MemLog,
    /// Whether a segment header has been read.
    started: bool,
    /// Live entries below the first segment kept, held by segments deleted since: the
    /// first header says the log ended at this index. A purge recorded in the kept segments
    /// always covers them; if none does, entries are missing.
    phantom_last: Option<u64>,
}

impl Replay {
    fn last(&self) -> Option<u64> {
        self.log.last().or(self.phantom_last)
    }

    fn next(&self) -> Option<u64> {
        match self.last() {
            Some(last) => Some(last + 1),
            None => self.log.purged.map(|p| p.saturating_add(1)),
        }
    }

    fn truncate(&mut self, from: u64) {
        self.log.truncate(from);
        if self.phantom_last.is_some_and(|l| l >= from) {
            self.phantom_last = from.checked_sub(1).filter(|&l| self.log.purged.is_none_or(|p| l > p));
        }
    }

    fn purge(&mut self, upto: u64) {
        self.log.purge(upto);
        if self.phantom_last.is_some_and(|l| l <= upto) {
            self.phantom_last = None;
        }
    }

    fn apply(&mut self, segment: &SegmentFile, offset: u64, record: Record<'_>) -> Result<(), WalError> {
        let corrupt = |reason: String| WalError::Corrupt { file: segment.path.clone(), offset, reason };
        let gap = |expected: Option<u64>, found: u64| WalError::Gap {
            file: segment.path.clone(),
            expected: expected.unwrap_or(0),
            found,
        };
        let first = segment.first;
        if offset == 0 && !matches!(record, Record::Header { .. }) {
            return Err(corrupt("the segment does not start with a segment header".into()));
        }
        match record {
            Record::Header { .. } if offset != 0 => {
                return Err(corrupt("a segment header in the middle of a segment".into()));
            }
            Record::Header { first_index, purged, prev_last } => {
                if first_index != first {
                    return Err(corrupt(format!(
                        "the segment header says it starts at entry {first_index}, its file name says {first}"
                    )));
                }
                if let Some(purged) = purged {
                    self.purge(purged);
                }
                self.truncate(first);
                if !self.started {
                    // Older segments may have been purged away: the header says what they held.
                    self.started = true;
                    self.phantom_last = prev_last.filter(|&l| l < first && purged.is_none_or(|p| l > p));
                    return Ok(());
                }
                let replayed = self.last();
                if replayed != prev_last {
                    return Err(match prev_last {
                        Some(prev_last) if replayed.is_none_or(|r| r < prev_last) => {
                            gap(self.next(), prev_last)
                        }
                        _ => corrupt(format!(
                            "the segment header says the log before it ends at entry {prev_last:?}, but the \
                             segments before it end at {replayed:?}"
                        )),
                    });
                }
            }
            Record::Entry { index, payload } => {
                if index < first || index == u64::MAX {
                    return Err(corrupt(format!("entry {index} cannot be in a segment starting at {first}")));
                }
                if let Some(expected) = self.next()
                    && index != expected
                {
                    if index > expected {
                        return Err(gap(Some(expected), index));
                    }
                    return Err(corrupt(format!("entry {index} overwrites entries before {expected}")));
                }
                self.log.push(index, payload.to_vec());
            }
            Record::Truncate { from } => {
                if from < first {
                    return Err(corrupt(format!(
                        "a truncation from {from} in a segment starting at {first}"
                    )));
                }
                self.truncate(from);
            }
            Record::Purge { upto } => self.purge(upto),
        }
        Ok(())
    }
}

/// Reads every segment, truncating a torn tail, and returns the log, the segments kept and
/// the length of the last one.
fn recover(dir: &Path) -> Result<(MemLog, Vec<SegmentFile>, u64), WalError> {
    let segments = segment::list(dir)?;
    let mut replay = Replay::default();
    let mut kept = Vec::with_capacity(segments.len());
    let mut last_len = 0;
    let count = segments.len();
    for (position, segment) in segments.into_iter().enumerate() {
        let is_last = position + 1 == count;
        let bytes = fs::read(&segment.path).map_err(io_at(&segment.path))?;
        if bytes.is_empty() && !is_last {
            return Err(WalError::Corrupt {
                file: segment.path,
                offset: 0,
                reason: "the segment is empty, but it is not the last one".into(),
            });
        }
        let torn = segment::scan(&segment.path, &bytes, is_last, |offset, record| {
            replay.apply(&segment, offset, record)
        })?;
        let mut len = bytes.len() as u64;
        if let Some(offset) = torn {
            tracing::warn!(
                file = %segment.path.display(),
                offset,
                discarded_bytes = len - offset,
                "write-ahead log ends in a torn write (interrupted by a crash, never acknowledged); truncating it"
            );
            let file = OpenOptions::new().write(true).open(&segment.path).map_err(io_at(&segment.path))?;
            file.set_len(offset).map_err(io_at(&segment.path))?;
            file.sync_all().map_err(io_at(&segment.path))?;
            len = offset;
        }
        if len == 0 {
            // Created but its header never made it to disk: nothing in it was acknowledged.
            tracing::warn!(file = %segment.path.display(), "removing an empty write-ahead log segment");
            fs::remove_file(&segment.path).map_err(io_at(&segment.path))?;
            segment::sync_dir(dir).map_err(io_at(dir))?;
            continue;
        }
        last_len = len;
        kept.push(segment);
    }
    if let (Some(missing), Some(first)) = (replay.phantom_last, kept.first()) {
        // Their segments were deleted without a purge covering them.
        let expected = replay.log.purged.map_or(0, |p| p.saturating_add(1));
        return Err(WalError::Gap { file: first.path.clone(), expected, found: missing + 1 });
    }
    Ok((replay.log, kept, last_len))
}

/// The write-ahead log. See the module documentation.
pub struct Wal {
    log: Mutex<MemLog>,
    /// Sent to while `log` is locked, so queue order is the order of the in-memory changes.
    sender: Option<Sender<Request>>,
    writer: Option<JoinHandle<()>>,
}

fn closed_error() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, WalError::Closed)
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// Checks an append batch on its own: consecutive indexes, sizes in bounds.
fn check_batch(entries: &[(u64, Vec<u8>)]) -> Result<(), io::Error> {
    let Some(&(first, _)) = entries.first() else { return Ok(()) };
    for (offset, (index, payload)) in entries.iter().enumerate() {
        if first.checked_add(offset as u64) != Some(*index) || *index == u64::MAX {
            return Err(invalid(format!(
                "write-ahead log entries must have consecutive indexes: entry {offset} of a batch starting at \
                 {first} has index {index}"
            )));
        }
        if payload.len() > record::MAX_PAYLOAD {
            return Err(invalid(format!(
                "write-ahead log entry {index} is {} bytes, more than the limit of {}",
                payload.len(),
                record::MAX_PAYLOAD
            )));
        }
    }
    Ok(())
}

impl Wal {
    /// Opens (creating if needed) the WAL in `dir` and recovers it as described in the
    /// module documentation.
    pub fn open(dir: &Path, options: WalOptions) -> Result<Wal, WalError> {
        if !dir.is_dir() {
            fs::create_dir_all(dir).map_err(io_at(dir))?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                segment::sync_dir(parent).map_err(io_at(parent))?;
            }
        }
        let (log, segments, active_len) = recover(dir)?;
        let writer = Writer::new(dir.to_owned(), options, segments, active_len).map_err(io_at(dir))?;
        let (sender, receiver) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("wal-writer".into())
            .spawn(move || writer.run(receiver))
            .map_err(io_at(dir))?;
        Ok(Wal { log: Mutex::new(log), sender: Some(sender), writer: Some(handle) })
    }

    fn lock(&self) -> MutexGuard<'_, MemLog> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `change` to the in-memory log and queues the request it returns, atomically
    /// with respect to other callers. Returns false if the writer is gone (after calling
    /// the callback with an error).
    fn enqueue(&self, done: Option<Durable>, change: impl FnOnce(&mut MemLog) -> (Op, LogState)) -> bool {
        let mut log = self.lock();
        let (op, state) = change(&mut log);
        let request = Request { op, state, done };
        let sent = match &self.sender {
            Some(sender) => sender.send(request).map_err(|e| e.0),
            None => Err(request),
        };
        drop(log);
        match sent {
            Ok(()) => true,
            Err(request) => {
                if let Some(done) = request.done {
                    done(Err(closed_error()));
                }
                false
            }
        }
    }

    /// Queues `entries` (consecutive indexes, the first following the last entry — or the
    /// purge point when the log is empty — or anything when the log has never held an
    /// entry nor been purged) and returns at once. They are readable immediately;
    /// `on_durable` runs on the writer thread once they are fsynced. A batch that does not
    /// follow the log is refused through `on_durable` with `InvalidInput`, in queue order.
    pub fn append(&self, entries: Vec<(u64, Vec<u8>)>, on_durable: Durable) {
        let checked = check_batch(&entries);
        let mut frames = Vec::new();
        if checked.is_ok() {
            frames.reserve(entries.iter().map(|(_, p)| p.len() + record::FRAME_HEADER + 8).sum());
            for (index, payload) in &entries {
                record::encode(&Record::Entry { index: *index, payload }, &mut frames);
            }
        }
        self.enqueue(Some(on_durable), move |log| {
            let Some(&(first, _)) = entries.first() else { return (Op::Sync, LogState::default()) };
            if let Err(e) = checked {
                return (Op::Reject(e), LogState::default());
            }
            if let Some(expected) = log.next()
                && first != expected
            {
                let message = format!(
                    "write-ahead log append starts at entry {first}, but the next entry is {expected}"
                );
                return (Op::Reject(invalid(message)), LogState::default());
            }
            // A segment started for these entries follows the log as it is before them.
            let state = log.state();
            for (index, payload) in entries {
                log.push(index, payload);
            }
            (Op::Append { first, frames }, state)
        });
    }

    /// Appends and waits until the entries are durable.
    pub fn append_blocking(&self, entries: Vec<(u64, Vec<u8>)>) -> io::Result<()> {
        let (tx, rx) = mpsc::channel();
        self.append(entries, Box::new(move |r| drop(tx.send(r))));
        rx.recv().map_err(|_| closed_error())?
    }

    /// Removes entries >= `from` (later appends reuse those indexes); `on_durable` runs
    /// once the removal is durable. Ordered with appends through the same queue.
    pub fn truncate_from(&self, from: u64, on_durable: Durable) {
        self.enqueue(Some(on_durable), |log| {
            let rotate_to = log.next().map_or(from, |next| next.min(from));
            log.truncate(from);
            (Op::Truncate { from, rotate_to }, log.state())
        });
    }

    /// Forgets entries <= `upto` (a snapshot covers them) at once, and queues a purge
    /// record; once it is durable the writer deletes the segment files holding only such
    /// entries (never the active one). Does not wait: call [`Wal::sync`] for that. Failing
    /// to delete a file is logged and retried at the next purge.
    pub fn purge_to(&self, upto: u64) -> Result<(), WalError> {
        let sent = self.enqueue(None, |log| {
            let rotate_to = log.next().unwrap_or(upto.saturating_add(1));
            log.purge(upto);
            (Op::Purge { upto, rotate_to }, log.state())
        });
        if sent { Ok(()) } else { Err(WalError::Closed) }
    }

    /// Waits until everything queued so far is durable (and purged files are deleted).
    pub fn sync(&self) -> io::Result<()> {
        let (tx, rx) = mpsc::channel();
        self.enqueue(Some(Box::new(move |r| drop(tx.send(r)))), |_| (Op::Sync, LogState::default()));
        rx.recv().map_err(|_| closed_error())?
    }

    /// The entries with index in `[start, end_exclusive)` that the log holds, in order.
    pub fn read_range(&self, start: u64, end_exclusive: u64) -> Result<Vec<(u64, Vec<u8>)>, WalError> {
        let log = self.lock();
        let (Some(first), Some(last)) = (log.first(), log.last()) else { return Ok(Vec::new()) };
        let from = start.max(first);
        let to = end_exclusive.min(last.saturating_add(1));
        if from >= to {
            return Ok(Vec::new());
        }
        // Both offsets are at most the number of entries, a usize.
        let skip = (from - log.start) as usize;
        let take = (to - from) as usize;
        Ok(log.entries.range(skip..skip + take).zip(from..).map(|(p, i)| (i, p.clone())).collect())
    }

    /// The first entry held, `None` when the log is empty.
    pub fn first_index(&self) -> Option<u64> {
        self.lock().first()
    }

    /// The last entry held, `None` when the log is empty.
    pub fn last_index(&self) -> Option<u64> {
        self.lock().last()
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        // Closing the queue lets the writer finish what is queued and stop.
        self.sender.take();
        let Some(writer) = self.writer.take() else { return };
        // Dropped by a callback on the writer thread itself: it stops once the callback returns.
        if writer.thread().id() != std::thread::current().id() && writer.join().is_err() {
            tracing::error!("the write-ahead log writer thread panicked");
        }
    }
}
