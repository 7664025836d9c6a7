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
//! **Memory.** The newest entry payloads are also held in memory, up to
//! [`WalOptions::held_bytes`]: entries are readable as soon as `append` returns, as
//! openraft expects, and the entries being applied or replicated to followers that keep up
//! are read without touching the disk. Once an entry is durable the writer thread says
//! where its record is; past the limit the oldest payloads are dropped and read back from
//! their segments (checksum and index checked) when asked for. Each append is numbered, so
//! a report for entries that were truncated and appended again meanwhile is ignored.

mod record;
mod segment;
mod writer;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use record::Record;
use segment::{OpenSegment, SegmentFile, io_at};
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
    /// Payload bytes of the newest entries held in memory; older ones are read back from
    /// their segments. Entries not yet durable are held whatever this says.
    pub held_bytes: u64,
    pub metrics: Option<Arc<dyn WalMetrics>>,
}

impl Default for WalOptions {
    fn default() -> Self {
        Self { segment_bytes: 64 << 20, held_bytes: 64 << 20, metrics: None }
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

/// Where an entry's record is: enough to read it back once its payload is let go.
#[derive(Clone)]
struct Location {
    file: Arc<OpenSegment>,
    offset: u64,
    len: u32,
}

impl Location {
    /// Reads the record back, checking that it is entry `index`'s.
    fn read(&self, index: u64) -> Result<Vec<u8>, WalError> {
        let path = &self.file.path;
        let mut bytes = vec![0; self.len as usize];
        self.file.file.read_exact_at(&mut bytes, self.offset).map_err(io_at(path))?;
        let corrupt = |reason: String| WalError::Corrupt { file: path.clone(), offset: self.offset, reason };
        match record::decode(&bytes) {
            Ok((Record::Entry { index: found, payload }, len)) if found == index && len == bytes.len() => {
                Ok(payload.to_vec())
            }
            Ok((Record::Entry { index: found, .. }, _)) => {
                Err(corrupt(format!("read back entry {index}, but the record there is entry {found}")))
            }
            Ok(_) => Err(corrupt(format!("read back entry {index}, but the record there is not an entry"))),
            Err(e) => Err(corrupt(format!("reading back entry {index}: {e}"))),
        }
    }
}

/// Entries looked up by [`Wal::look_up`], consecutive from `from`.
#[derive(Default)]
pub struct Found {
    from: u64,
    entries: Vec<Result<Vec<u8>, Location>>,
}

impl Found {
    /// Whether reading them touches the disk (blocking).
    pub fn on_disk(&self) -> bool {
        self.entries.iter().any(|e| e.is_err())
    }

    /// The payloads, those let go read back from their segments.
    pub fn read(self) -> Result<Vec<(u64, Vec<u8>)>, WalError> {
        // The finite side first: no index past the last entry is made.
        self.entries
            .into_iter()
            .zip(self.from..)
            .map(|(payload, index)| match payload {
                Ok(payload) => Ok((index, payload)),
                Err(location) => location.read(index).map(|payload| (index, payload)),
            })
            .collect()
    }
}

/// One live entry.
struct Slot {
    /// The append that put it here: a truncation and a new append can reuse its index
    /// before the writer reports where the first append's record went.
    append: u64,
    body: Body,
}

enum Body {
    /// The location is known once the record is durable.
    Held { payload: Vec<u8>, location: Option<Location> },
    /// Let go: read it back from here.
    OnDisk(Location),
}

impl Body {
    fn held_len(&self) -> u64 {
        match self {
            Body::Held { payload, .. } => payload.len() as u64,
            Body::OnDisk(_) => 0,
        }
    }
}

/// The live entries (consecutive indexes), the purge point, and which payloads are held.
#[derive(Default)]
struct MemLog {
    /// Index of `entries[0]`; meaningless when `entries` is empty.
    start: u64,
    entries: VecDeque<Slot>,
    purged: Option<u64>,
    /// Entries below this index have been let go, the rest are held.
    held_from: u64,
    /// The payload bytes held.
    held_bytes: u64,
    /// How many payload bytes to hold at most, once they are durable.
    hold_limit: u64,
    /// Numbers the appends.
    appends: u64,
}

fn lock(log: &Mutex<MemLog>) -> MutexGuard<'_, MemLog> {
    log.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemLog {
    fn new(hold_limit: u64) -> Self {
        MemLog { hold_limit, ..MemLog::default() }
    }

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

    /// Adds the entry after the last one (or starts the log at `index`), from append
    /// `append`, at `location` if it is known.
    fn push(&mut self, index: u64, payload: Vec<u8>, append: u64, location: Option<Location>) {
        if self.entries.is_empty() {
            self.start = index;
            self.held_from = index;
        }
        self.held_bytes += payload.len() as u64;
        self.entries.push_back(Slot { append, body: Body::Held { payload, location } });
        self.let_go();
    }

    /// Numbers a new append.
    fn next_append(&mut self) -> u64 {
        self.appends += 1;
        self.appends
    }

    /// Drops the payloads of removed entries from the count of bytes held.
    fn forget<'a>(&mut self, removed: impl Iterator<Item = &'a Slot>) {
        let bytes: u64 = removed.map(|s| s.body.held_len()).sum();
        self.held_bytes -= bytes;
    }

    fn truncate(&mut self, from: u64) {
        let keep =
            if from <= self.start { 0 } else { usize::try_from(from - self.start).unwrap_or(usize::MAX) };
        if keep < self.entries.len() {
            let removed: Vec<Slot> = self.entries.drain(keep..).collect();
            self.forget(removed.iter());
        }
        self.held_from = self.held_from.min(from);
    }

    fn purge(&mut self, upto: u64) {
        self.purged = self.purged.max(Some(upto));
        let Some(last) = self.last() else { return };
        if upto >= self.start {
            // At most len entries, a usize.
            let drop = (upto.min(last) - self.start + 1) as usize;
            let removed: Vec<Slot> = self.entries.drain(..drop).collect();
            self.forget(removed.iter());
            // An empty log when upto is u64::MAX: no index follows.
            self.start = upto.saturating_add(1);
            self.held_from = self.held_from.max(self.start);
        }
    }

    /// Records where append `append`'s entries from `first` on are, then lets go of what
    /// the limit says. Entries removed or appended again since are skipped.
    fn located(&mut self, append: u64, first: u64, locations: impl Iterator<Item = Location>) {
        // The finite side first: no index past the last location is made.
        for (location, index) in locations.zip(first..) {
            let Some(position) = index.checked_sub(self.start) else { continue };
            let Some(slot) = usize::try_from(position).ok().and_then(|p| self.entries.get_mut(p)) else {
                break;
            };
            if slot.append == append
                && let Body::Held { location: known, .. } = &mut slot.body
            {
                *known = Some(location);
            }
        }
        self.let_go();
    }

    /// Lets go of the oldest held payloads whose records are durable until the bytes held
    /// are within the limit.
    fn let_go(&mut self) {
        while self.held_bytes > self.hold_limit {
            let position = self.held_from.checked_sub(self.start).and_then(|p| usize::try_from(p).ok());
            let Some(slot) = position.and_then(|p| self.entries.get_mut(p)) else { break };
            let Body::Held { payload, location: Some(location) } = &slot.body else { break };
            self.held_bytes -= payload.len() as u64;
            slot.body = Body::OnDisk(location.clone());
            self.held_from += 1;
        }
    }

    /// The payloads of the entries at `positions` where they are held, else where to
    /// read them.
    fn get(&self, positions: std::ops::Range<usize>) -> Vec<Result<Vec<u8>, Location>> {
        let get = |slot: &Slot| match &slot.body {
            Body::Held { payload, .. } => Ok(payload.clone()),
            Body::OnDisk(location) => Err(location.clone()),
        };
        self.entries.range(positions).map(get).collect()
    }
}

/// Rebuilds the log from the segments' records, checking they form one consistent history.
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

    fn new(hold_limit: u64) -> Self {
        Replay { log: MemLog::new(hold_limit), started: false, phantom_last: None }
    }

    fn apply(
        &mut self,
        segment: &SegmentFile,
        file: &Arc<OpenSegment>,
        offset: u64,
        len: usize,
        record: Record<'_>,
    ) -> Result<(), WalError> {
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
                // Frames are at most MAX_BODY plus a header, well within a u32.
                let location = Location { file: file.clone(), offset, len: len as u32 };
                self.log.push(index, payload.to_vec(), 0, Some(location));
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
fn recover(dir: &Path, hold_limit: u64) -> Result<(MemLog, Vec<SegmentFile>, u64), WalError> {
    let segments = segment::list(dir)?;
    let mut replay = Replay::new(hold_limit);
    let mut kept = Vec::with_capacity(segments.len());
    let mut last_len = 0;
    let count = segments.len();
    for (position, segment) in segments.into_iter().enumerate() {
        let is_last = position + 1 == count;
        let mut file = File::open(&segment.path).map_err(io_at(&segment.path))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io_at(&segment.path))?;
        let file = Arc::new(OpenSegment { path: segment.path.clone(), file });
        if bytes.is_empty() && !is_last {
            return Err(WalError::Corrupt {
                file: segment.path,
                offset: 0,
                reason: "the segment is empty, but it is not the last one".into(),
            });
        }
        let torn = segment::scan(&segment.path, &bytes, is_last, |offset, len, record| {
            replay.apply(&segment, &file, offset, len, record)
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
    /// Shared with the writer, which says where durable entries are.
    log: Arc<Mutex<MemLog>>,
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
        let (log, segments, active_len) = recover(dir, options.held_bytes)?;
        let log = Arc::new(Mutex::new(log));
        let writer =
            Writer::new(dir.to_owned(), options, log.clone(), segments, active_len).map_err(io_at(dir))?;
        let (sender, receiver) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("wal-writer".into())
            .spawn(move || writer.run(receiver))
            .map_err(io_at(dir))?;
        Ok(Wal { log, sender: Some(sender), writer: Some(handle) })
    }

    fn lock(&self) -> MutexGuard<'_, MemLog> {
        lock(&self.log)
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
        let mut lengths = Vec::new();
        if checked.is_ok() {
            frames.reserve(entries.iter().map(|(_, p)| p.len() + record::FRAME_HEADER + 8).sum());
            lengths.reserve(entries.len());
            for (index, payload) in &entries {
                let start = frames.len();
                record::encode(&Record::Entry { index: *index, payload }, &mut frames);
                // check_batch bounded the payload, so the frame fits a u32.
                lengths.push((frames.len() - start) as u32);
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
            let append = log.next_append();
            for (index, payload) in entries {
                log.push(index, payload, append, None);
            }
            (Op::Append { first, append, frames, lengths }, state)
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
    /// Entries no longer held in memory are read back from their segments, outside the lock.
    pub fn read_range(&self, start: u64, end_exclusive: u64) -> Result<Vec<(u64, Vec<u8>)>, WalError> {
        self.look_up(start, end_exclusive).read()
    }

    /// The entries with index in `[start, end_exclusive)`: their payloads where they are held,
    /// else where to read them, so that a caller on an async runtime can read those off it.
    pub fn look_up(&self, start: u64, end_exclusive: u64) -> Found {
        let log = self.lock();
        let (Some(first), Some(last)) = (log.first(), log.last()) else { return Found::default() };
        let from = start.max(first);
        let to = end_exclusive.min(last.saturating_add(1));
        if from >= to {
            return Found::default();
        }
        // Both offsets are at most the number of entries, a usize.
        let skip = (from - log.start) as usize;
        let take = (to - from) as usize;
        Found { from, entries: log.get(skip..skip + take) }
    }

    /// The payload bytes held in memory.
    pub fn held_bytes(&self) -> u64 {
        self.lock().held_bytes
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
