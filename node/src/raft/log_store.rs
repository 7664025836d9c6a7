//! openraft's log storage over our write-ahead log. Entries are postcard-encoded into WAL
//! records; the vote and the purge point live in a hard-state file beside the segments.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex};

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use serde::{Deserialize, Serialize};

use super::types::{Entry, LogId, TypeConfig, Vote};
use crate::metrics::{Metrics, WriteStage};
use crate::storage::hard_state::HardStateFile;
use crate::storage::wal::{Wal, WalOptions};

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct HardState {
    vote: Option<Vote>,
    /// Entries up to here are covered by a snapshot and may be gone from the WAL.
    last_purged: Option<LogId>,
}

struct Inner {
    wal: Wal,
    hard_state: Mutex<HardState>,
    hard_state_file: HardStateFile,
    metrics: Metrics,
}

/// Cheap to clone: the log reader openraft asks for is another handle on the same log.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

fn invalid_data(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

fn encode<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    postcard::to_stdvec(value).map_err(invalid_data)
}

fn hard_state_file(dir: &Path) -> HardStateFile {
    HardStateFile::new(dir.join("hardstate"))
}

impl LogStore {
    /// Creates the log of a member restored from a snapshot: no entries, no vote, and
    /// everything up to `last_purged` counted as purged (the snapshot covers it), so the
    /// leader sends a member that lacks it the snapshot, never the log before it. Refuses
    /// to overwrite a log that exists.
    pub fn create_after_snapshot(dir: &Path, last_purged: LogId) -> io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let file = hard_state_file(dir);
        if file.load()?.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} already holds a Raft log", dir.display()),
            ));
        }
        file.save(&encode(&HardState { vote: None, last_purged: Some(last_purged) })?)
    }

    /// Opens (or creates) the log in `dir`, recovering the WAL (see `Wal::open`). The WAL
    /// reports its fsyncs and bytes, and the log its write stages, to `metrics`.
    pub fn open(dir: &Path, options: WalOptions, metrics: Metrics) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let options = WalOptions { metrics: Some(Arc::new(metrics.clone())), ..options };
        let wal = Wal::open(&dir.join("wal"), options).map_err(io::Error::other)?;
        let hard_state_file = hard_state_file(dir);
        let hard_state = match hard_state_file.load()? {
            Some(bytes) => postcard::from_bytes(&bytes).map_err(invalid_data)?,
            None => HardState::default(),
        };
        Ok(Self {
            inner: Arc::new(Inner { wal, hard_state: Mutex::new(hard_state), hard_state_file, metrics }),
        })
    }

    fn hard_state(&self) -> HardState {
        self.inner.hard_state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Changes the hard state and makes the change durable before returning.
    async fn update_hard_state(&self, change: impl FnOnce(&mut HardState)) -> io::Result<()> {
        let inner = self.inner.clone();
        let mut state = self.hard_state();
        change(&mut state);
        let bytes = encode(&state)?;
        tokio::task::spawn_blocking(move || {
            inner.hard_state_file.save(&bytes)?;
            *inner.hard_state.lock().unwrap_or_else(|p| p.into_inner()) = state;
            Ok(())
        })
        .await
        .map_err(io::Error::other)?
    }

    fn last_entry_log_id(&self) -> io::Result<Option<LogId>> {
        let Some(last) = self.inner.wal.last_index() else { return Ok(None) };
        let entries = self.inner.wal.read_range(last, last + 1).map_err(io::Error::other)?;
        match entries.first() {
            Some((_, bytes)) => {
                let entry: Entry = postcard::from_bytes(bytes).map_err(invalid_data)?;
                Ok(Some(entry.log_id()))
            }
            None => Ok(None),
        }
    }
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s + 1,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e + 1,
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (start, end) = bounds(&range);
        let found = self.inner.wal.look_up(start, end);
        // Entries let go of in memory are read back from the WAL's files: off the runtime,
        // whose threads also carry heartbeats.
        let records = if found.on_disk() {
            tokio::task::spawn_blocking(move || found.read()).await.map_err(io::Error::other)?
        } else {
            found.read()
        };
        let records = records.map_err(io::Error::other)?;
        records.iter().map(|(_, bytes)| postcard::from_bytes(bytes).map_err(invalid_data)).collect()
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.hard_state().vote)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged = self.hard_state().last_purged;
        let last_entry = self.last_entry_log_id()?;
        let last_log_id = match (&last_entry, &last_purged) {
            (Some(entry), Some(purged)) if entry.index <= purged.index => last_purged,
            (Some(_), _) => last_entry,
            (None, _) => last_purged,
        };
        Ok(LogState { last_purged_log_id: last_purged, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let vote = *vote;
        self.update_hard_state(|state| state.vote = Some(vote)).await
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let records = entries
            .into_iter()
            .map(|entry| Ok((entry.log_id().index, encode(&entry)?)))
            .collect::<io::Result<Vec<_>>>()?;
        let Some(&(first_index, _)) = records.first() else {
            callback.io_completed(Ok(()));
            return Ok(());
        };
        let metrics = self.inner.metrics.clone();
        let appended = metrics.log_appended(first_index);
        // The WAL's writer thread calls back once the batch (and whatever else was queued
        // with it) has been fdatasync'ed: only then does openraft count the entries stored.
        self.inner.wal.append(
            records,
            Box::new(move |result| {
                metrics.write_stage(WriteStage::Persist, appended.elapsed());
                callback.io_completed(result)
            }),
        );
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |id| id.index + 1);
        self.inner.metrics.log_truncated(from);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.inner.wal.truncate_from(
            from,
            Box::new(move |result| {
                let _ = tx.send(result);
            }),
        );
        rx.await.map_err(|_| io::Error::other("write-ahead log writer stopped"))?
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let index = log_id.index;
        // Record the purge point first: a crash after it but before the segments go only
        // leaves extra entries behind, never a log that starts later than it says.
        self.update_hard_state(|state| state.last_purged = Some(log_id)).await?;
        self.inner.wal.purge_to(index).map_err(io::Error::other)
    }
}
