//! The writer thread: owns the active segment, commits queued requests in groups.

use std::fs;
use std::io::{self, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::record::{self, Record};
use super::segment::{self, OpenSegment, SegmentFile};
use super::{Durable, Location, MemLog, WalOptions, lock};

/// What the writer must do. The caller computed everything that depends on the log's
/// logical state (under the lock that also orders the queue), so the writer only tracks
/// files.
pub(super) enum Op {
    /// `frames` holds the entry records, the first for index `first`, of the lengths in
    /// `lengths`; `append` names this append in the in-memory log.
    Append { first: u64, append: u64, frames: Vec<u8>, lengths: Vec<u32> },
    /// Remove entries >= `from`. If this needs a new segment, it starts at `rotate_to`
    /// (`from`, or the next index if that is lower).
    Truncate { from: u64, rotate_to: u64 },
    /// Entries <= `upto` are covered by a snapshot. If this needs a new segment, it starts
    /// at `rotate_to` (the next index before the purge).
    Purge { upto: u64, rotate_to: u64 },
    /// Nothing to write; acknowledge once everything queued before is durable.
    Sync,
    /// Refused by the caller; reported in queue order.
    Reject(io::Error),
}

/// What the header of a segment created for a request says about the log before it.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct LogState {
    pub purged: Option<u64>,
    /// The last entry (below the new segment's first index).
    pub prev_last: Option<u64>,
}

pub(super) struct Request {
    pub op: Op,
    pub state: LogState,
    pub done: Option<Durable>,
}

struct Active {
    segment: SegmentFile,
    file: Arc<OpenSegment>,
    len: u64,
    /// Written since the last `sync_data`.
    dirty: bool,
}

/// Where one append's records went, reported to the in-memory log once durable.
struct Written {
    append: u64,
    first: u64,
    file: Arc<OpenSegment>,
    offset: u64,
    lengths: Vec<u32>,
}

pub(super) struct Writer {
    dir: PathBuf,
    options: WalOptions,
    /// Told where durable entries are, so it can let go of their payloads.
    log: Arc<Mutex<MemLog>>,
    /// Older segments, oldest first; the active one is not among them.
    closed: Vec<SegmentFile>,
    active: Option<Active>,
    /// Set by the first I/O error: nothing is written after it (the state of the files is
    /// unknown and a failed fsync cannot be retried safely); the member must restart.
    failed: Option<(io::ErrorKind, String)>,
    /// Bytes written in the current batch.
    written: u64,
    /// The current batch's appends.
    appended: Vec<Written>,
}

fn copy_error(kind: io::ErrorKind, message: &str) -> io::Error {
    io::Error::new(kind, message.to_owned())
}

impl Writer {
    pub fn new(
        dir: PathBuf,
        options: WalOptions,
        log: Arc<Mutex<MemLog>>,
        mut segments: Vec<SegmentFile>,
        active_len: u64,
    ) -> io::Result<Self> {
        let active = match segments.pop() {
            Some(segment) => {
                let file = fs::OpenOptions::new().read(true).append(true).open(&segment.path)?;
                let file = Arc::new(OpenSegment { path: segment.path.clone(), file });
                Some(Active { segment, file, len: active_len, dirty: false })
            }
            None => None,
        };
        Ok(Writer {
            dir,
            options,
            log,
            closed: segments,
            active,
            failed: None,
            written: 0,
            appended: Vec::new(),
        })
    }

    pub fn run(mut self, requests: Receiver<Request>) {
        // Ends once the `Wal` is dropped and everything it queued has been handled.
        while let Ok(first) = requests.recv() {
            let mut batch = vec![first];
            batch.extend(requests.try_iter());
            self.commit(batch);
        }
    }

    /// Writes every request of the batch, syncs once, then calls back in order.
    fn commit(&mut self, mut batch: Vec<Request>) {
        let mut purge_upto = None;
        let outcome = if self.failed.is_some() {
            Ok(())
        } else {
            let outcome = self.write_batch(&mut batch, &mut purge_upto);
            if let Err(e) = &outcome {
                tracing::error!(dir = %self.dir.display(), error = %e, "write-ahead log write failed; refusing further writes");
                self.failed = Some((e.kind(), e.to_string()));
            }
            outcome
        };
        let appended = std::mem::take(&mut self.appended);
        if outcome.is_ok() && self.failed.is_none() {
            // Only durable records are read back: after a failed fsync the file's contents
            // are unknown.
            let mut log = lock(&self.log);
            for written in appended {
                let mut offset = written.offset;
                let locations = written.lengths.into_iter().map(|len| {
                    let location = Location { file: written.file.clone(), offset, len };
                    offset += u64::from(len);
                    location
                });
                log.located(written.append, written.first, locations);
            }
            drop(log);
            if let Some(upto) = purge_upto {
                self.delete_purged(upto);
            }
        }
        for request in batch {
            let result = match (request.op, &self.failed) {
                (Op::Reject(e), _) => Err(e),
                (_, Some((kind, message))) => Err(copy_error(
                    *kind,
                    &format!("write-ahead log failed earlier ({message}); restart the member"),
                )),
                _ => Ok(()),
            };
            if let Some(done) = request.done
                && catch_unwind(AssertUnwindSafe(move || done(result))).is_err()
            {
                tracing::error!("a write-ahead log callback panicked");
            }
        }
    }

    fn write_batch(&mut self, batch: &mut [Request], purge_upto: &mut Option<u64>) -> io::Result<()> {
        self.written = 0;
        for request in batch.iter_mut() {
            let state = request.state;
            match &mut request.op {
                Op::Append { first, append, frames, lengths } => {
                    let first = *first;
                    if self.active.as_ref().is_none_or(|a| self.is_full(a) || first < a.segment.first) {
                        self.rotate(first, state)?;
                    }
                    let offset = self.active.as_ref().map_or(0, |a| a.len);
                    self.write(frames)?;
                    // The memory is not needed any more; the payloads live in the log.
                    *frames = Vec::new();
                    if let Some(active) = &self.active {
                        self.appended.push(Written {
                            append: *append,
                            first,
                            file: active.file.clone(),
                            offset,
                            lengths: std::mem::take(lengths),
                        });
                    }
                }
                Op::Truncate { from, rotate_to } => {
                    if self.active.as_ref().is_some_and(|a| !self.is_full(a) && *from >= a.segment.first) {
                        let mut frame = Vec::new();
                        record::encode(&Record::Truncate { from: *from }, &mut frame);
                        self.write(&frame)?;
                    } else {
                        // The new segment's header removes entries >= rotate_to (<= from).
                        self.rotate(*rotate_to, state)?;
                    }
                }
                Op::Purge { upto, rotate_to } => {
                    if self.active.as_ref().is_some_and(|a| !self.is_full(a)) {
                        let mut frame = Vec::new();
                        record::encode(&Record::Purge { upto: *upto }, &mut frame);
                        self.write(&frame)?;
                    } else {
                        // The new segment's header records the purge point.
                        self.rotate(*rotate_to, state)?;
                    }
                    *purge_upto = (*purge_upto).max(Some(*upto));
                }
                Op::Sync | Op::Reject(_) => {}
            }
        }
        self.sync_active()?;
        if self.written > 0
            && let Some(metrics) = &self.options.metrics
        {
            metrics.wrote(self.written);
        }
        Ok(())
    }

    fn is_full(&self, active: &Active) -> bool {
        active.len >= self.options.segment_bytes
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let Some(active) = self.active.as_mut() else {
            return Err(io::Error::other("write-ahead log has no active segment"));
        };
        (&active.file.file).write_all(bytes)?;
        active.len += bytes.len() as u64;
        active.dirty = true;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn sync_active(&mut self) -> io::Result<()> {
        let Some(active) = self.active.as_mut() else { return Ok(()) };
        if !active.dirty {
            return Ok(());
        }
        let started = Instant::now();
        crate::failpoint::eval("wal-fsync")?;
        active.file.file.sync_data()?;
        let took = started.elapsed();
        active.dirty = false;
        if let Some(metrics) = &self.options.metrics {
            metrics.fsync(took);
        }
        Ok(())
    }

    /// Starts a new active segment at `first`, whose header says entries >= `first` are
    /// gone, entries <= `state.purged` are purged, and the log ends at `state.prev_last`.
    ///
    /// Segments starting at or after `first` hold nothing the new header keeps (a segment
    /// only holds entries >= its first index), so they are deleted first — newest first,
    /// so a crash in between leaves an older, consistent prefix of the log — keeping the
    /// names in write order. The active segment, if kept, is synced before it is closed:
    /// only the last segment may end in a torn write.
    fn rotate(&mut self, first: u64, state: LogState) -> io::Result<()> {
        let mut doomed = Vec::new();
        if self.active.as_ref().is_some_and(|a| a.segment.first < first) {
            self.sync_active()?;
        }
        if let Some(active) = self.active.take() {
            if active.segment.first < first {
                self.closed.push(active.segment);
            } else {
                doomed.push(active.segment);
            }
        }
        while self.closed.last().is_some_and(|s| s.first >= first) {
            doomed.extend(self.closed.pop());
        }
        for segment in &doomed {
            tracing::debug!(file = %segment.path.display(), "deleting a write-ahead log segment superseded by a truncation");
            fs::remove_file(&segment.path)?;
        }
        // Creating the segment syncs the directory, which also makes the removals durable.
        let (segment, file) = segment::create(&self.dir, first)?;
        self.active = Some(Active { segment, file, len: 0, dirty: false });
        let mut header = Vec::new();
        record::encode(
            &Record::Header { first_index: first, purged: state.purged, prev_last: state.prev_last },
            &mut header,
        );
        self.write(&header)
    }

    /// Deletes the oldest closed segments whose entries are all <= `upto`, now that the
    /// purge record is durable. A segment's live entries all precede the next segment's
    /// first index, so that name decides. Failures are logged and retried on the next purge.
    fn delete_purged(&mut self, upto: u64) {
        let mut deleted = false;
        while let Some(oldest) = self.closed.first() {
            let next_first =
                self.closed.get(1).map(|s| s.first).or(self.active.as_ref().map(|a| a.segment.first));
            let covered = next_first.is_some_and(|next| next == 0 || next - 1 <= upto);
            if !covered {
                break;
            }
            match fs::remove_file(&oldest.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %oldest.path.display(), error = %e, "could not delete a purged write-ahead log segment; will retry");
                    break;
                }
            }
            self.closed.remove(0);
            deleted = true;
        }
        if deleted && let Err(e) = segment::sync_dir(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "could not sync the write-ahead log directory after purging");
        }
    }
}
