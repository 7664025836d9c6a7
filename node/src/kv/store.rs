use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, TryLockError};
use std::time::{Duration, Instant};

use prost::Message;
use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};

use crate::proto::mvccpb::event::EventType;
use crate::proto::mvccpb::{Event, KeyValue};

/// Every version of every key, deletions included: (key, revision) -> a small `Version` record,
/// without the value. Values are kept apart, in VALUES, in the order of the revisions that wrote
/// them, as etcd keeps its history: they are appended (redb packs an ascending table's pages
/// full) and a request that touches many keys rewrites only these small rows. When the values
/// lived here, under each key, a DeleteRange of 150k keys copied every page of the store (470
/// MB for 150k puts of 1 KiB) and doubled the file.
const VERSIONS: TableDefinition<(&[u8], i64), &[u8]> = TableDefinition::new("versions");
/// The value of each put: (revision, the put's place among its revision's puts) -> value.
const VALUES: TableDefinition<(i64, u32), &[u8]> = TableDefinition::new("values");
/// Earlier layouts, converted on open: every version's whole key-value under (key, revision),
/// each live key's revision beside it, and before that each live key's whole key-value.
const OLD_HISTORY: TableDefinition<(&[u8], i64), &[u8]> = TableDefinition::new("history");
const OLD_LIVE_REVISIONS: TableDefinition<&[u8], i64> = TableDefinition::new("live_revisions");
const OLD_LIVE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("live");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// lease id -> granted TTL in seconds.
const LEASES: TableDefinition<i64, i64> = TableDefinition::new("leases");
/// (lease id, key) for every live key attached to a lease, so revoking finds its keys.
const LEASE_KEYS: TableDefinition<(i64, &[u8]), ()> = TableDefinition::new("lease_keys");

const META_REVISION: &str = "revision";
const META_COMPACT_REVISION: &str = "compact_revision";

/// etcd's errors for reads at revisions it cannot serve, with etcd's messages.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("mvcc: required revision has been compacted")]
    Compacted { compact_revision: i64 },
    #[error("mvcc: required revision is a future revision")]
    FutureRevision,
    #[error("key-value store: {0}")]
    Storage(#[from] redb::Error),
    #[error("key-value store: corrupt record under key {key:?}: {reason}")]
    Corrupt { key: Vec<u8>, reason: String },
    /// Transactions stayed open for as long as defragmentation was willing to wait.
    #[error("key-value store: busy, transactions stayed open")]
    Busy,
    /// Applied writes were lost with a batch that failed: see `Uncommitted::Lost`.
    #[error("key-value store: applied writes were lost when applying failed; the member must restart")]
    Lost,
}

pub(super) fn storage<E: Into<redb::Error>>(err: E) -> KvError {
    KvError::Storage(err.into())
}

/// The store. Cheap to share behind an `Arc`: redb serializes writers and lets readers
/// run beside them on a consistent snapshot.
///
/// The lock exists for `defragment` only: redb compacts through `&mut Database`. Starting a
/// transaction takes the lock shared for that moment alone (transactions do not borrow the
/// database), so transactions never wait on each other through it.
///
/// Applied writes are committed lazily (`applying`): a redb commit cost each batch of
/// applied entries about a tenth of a put's CPU at 16 and 256 clients. So the writes of
/// batches since the last commit stay in one open write transaction, and whatever needs
/// them committed (a read, another write, a durable commit, defragmentation) commits it
/// first. Every reader thus sees every write applied before it began, as before.
pub struct MvccStore {
    db: RwLock<Database>,
    /// The applied writes not committed yet. Always locked before `db`.
    uncommitted: Mutex<Uncommitted>,
    /// Told when a batch that may take long is done (`Uncommitted::LongBatch`).
    long_batch_done: Condvar,
    /// Told how long each commit of applied writes took.
    commit_observer: OnceLock<CommitObserver>,
    /// Bytes of keys and values applied since the last durable commit (`bytes_not_durable`).
    bytes_not_durable: AtomicU64,
}

/// Called with the time each commit of applied writes took: etcd's backend commit duration.
pub type CommitObserver = Box<dyn Fn(Duration) + Send + Sync>;

enum Uncommitted {
    None,
    Batch(Box<WriteBatch>),
    /// A batch that may take long is being applied, in a write transaction of its own and
    /// after the earlier writes were committed. Readers need nothing of it (a large
    /// DeleteRange in it commits its entries before the delete, and readers may see those
    /// before the batch ends: `Applying::delete_range`); what needs the write transaction
    /// waits for it without holding the lock (`settled`), so that readers do not wait
    /// behind them.
    LongBatch,
    /// A batch failed while being applied, after earlier batches' writes were answered but
    /// not committed: they are lost with it, so the store serves nothing more (the member
    /// stops on the error and re-applies them from the log when it starts again).
    Lost,
}

/// redb's own default: stores opened for a restore, a conversion or a test keep it.
const REDB_DEFAULT_CACHE_BYTES: usize = 1 << 30;

/// How long `defragment` keeps retrying while transactions are open.
const DEFRAGMENT_PATIENCE: Duration = Duration::from_secs(10);

impl MvccStore {
    /// Opens the store at `path`, making a new one if there is none. A new store is made
    /// under another name and renamed into place once its tables are committed: a member
    /// killed while making it (on its very first start) left a half-written file that redb
    /// never opened again ("Not a redb database"), so the member could not start at all.
    pub fn open(path: &Path) -> Result<Self, KvError> {
        Self::open_with_cache(path, REDB_DEFAULT_CACHE_BYTES)
    }

    /// `open`, keeping at most `cache_bytes` of the file's pages in memory.
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> Result<Self, KvError> {
        if !path.exists() {
            create(path)?;
        }
        let db = redb::Builder::new().set_cache_size(cache_bytes).open(path).map_err(storage)?;
        initialize(&db)?;
        Ok(Self {
            db: RwLock::new(db),
            uncommitted: Mutex::new(Uncommitted::None),
            long_batch_done: Condvar::new(),
            commit_observer: OnceLock::new(),
            bytes_not_durable: AtomicU64::new(0),
        })
    }

    /// Has `observer` told how long each later commit of applied writes takes; only the
    /// first observer set is kept.
    pub fn observe_commits(&self, observer: CommitObserver) {
        let _ = self.commit_observer.set(observer);
    }

    fn db(&self) -> RwLockReadGuard<'_, Database> {
        // A panic elsewhere while holding the lock leaves the database itself intact.
        self.db.read().unwrap_or_else(|p| p.into_inner())
    }

    /// What a crash would leave of the store file at `path`: a copy of it as it is now, in
    /// `scratch`, opened on its own.
    #[cfg(test)]
    pub(crate) fn open_crash_copy(path: &Path, scratch: &Path) -> MvccStore {
        let copy = scratch.join("crashed");
        std::fs::copy(path, &copy).expect("copy the store");
        MvccStore::open(&copy).expect("open the copy")
    }

    /// A consistent read-only view at the moment of the call, with every applied write.
    pub fn read(&self) -> Result<ReadView, KvError> {
        self.commit_applied(&mut self.lock_uncommitted(), false)?;
        Ok(ReadView { txn: self.db().begin_read().map_err(storage)? })
    }

    /// A batch of writes applied atomically by `commit`. `durable` false leaves the fsync to
    /// a later durable commit: the Raft log already holds every applied entry, so a crash
    /// only means re-applying the tail of the log.
    pub fn write(&self, durable: bool) -> Result<WriteBatch, KvError> {
        // Held until the batch has begun, so that no new applied writes slip in first.
        let _settled = self.settled(false)?;
        self.begin_write(durable)
    }

    /// The batch the state machine applies entries to.
    ///
    /// `brief`: the entries apply quickly, as puts do. Their batch is then the applied writes
    /// not committed yet, or a new one, and readers and writers wait until `Applying::finish`,
    /// which leaves its writes uncommitted too. Otherwise (a DeleteRange may take seconds)
    /// the applied writes are committed first, so that readers need not wait for this batch,
    /// and `finish` commits it (a large DeleteRange commits steps of it before:
    /// `Applying::delete_range`).
    pub fn applying(&self, brief: bool) -> Result<Applying<'_>, KvError> {
        if !brief {
            let (mut uncommitted, _) = self.settled(false)?;
            let batch = self.begin_write(false)?;
            *uncommitted = Uncommitted::LongBatch;
            return Ok(Applying { store: self, uncommitted: None, batch: Some(Box::new(batch)) });
        }
        self.applying_briefly(self.lock_without_long_batch())
    }

    /// `applying(true)` at once, or `None` if a reader or a durable commit is committing the
    /// applied writes now: a caller on the async runtime's thread then applies on another.
    pub fn try_applying_briefly(&self) -> Result<Option<Applying<'_>>, KvError> {
        let uncommitted = match self.uncommitted.try_lock() {
            Ok(uncommitted) => uncommitted,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return Ok(None),
        };
        if matches!(*uncommitted, Uncommitted::LongBatch) {
            return Ok(None);
        }
        self.applying_briefly(uncommitted).map(Some)
    }

    fn applying_briefly<'a>(
        &'a self,
        mut uncommitted: MutexGuard<'a, Uncommitted>,
    ) -> Result<Applying<'a>, KvError> {
        // Until `finish`, the slot says what a failure would leave: the earlier batches' writes
        // lost with this one, or nothing lost if there were none.
        let batch = match std::mem::replace(&mut *uncommitted, Uncommitted::Lost) {
            Uncommitted::Batch(batch) => batch,
            Uncommitted::None => {
                *uncommitted = Uncommitted::None;
                Box::new(self.begin_write(false)?)
            }
            Uncommitted::LongBatch => unreachable!("taken without a batch that may take long"),
            Uncommitted::Lost => return Err(KvError::Lost),
        };
        Ok(Applying { store: self, uncommitted: Some(uncommitted), batch: Some(batch) })
    }

    fn lock_uncommitted(&self) -> MutexGuard<'_, Uncommitted> {
        // A panic while applying left `Lost` in it (see `Applying`), which is what it says.
        self.uncommitted.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lock, once no batch that may take long is being applied: no write transaction is
    /// open but the applied writes'.
    fn lock_without_long_batch(&self) -> MutexGuard<'_, Uncommitted> {
        let mut uncommitted = self.lock_uncommitted();
        while matches!(*uncommitted, Uncommitted::LongBatch) {
            uncommitted = self.long_batch_done.wait(uncommitted).unwrap_or_else(|p| p.into_inner());
        }
        uncommitted
    }

    /// The lock, once the applied writes are committed (durably if `durable`) and no batch
    /// that may take long is being applied: a write transaction begun under it starts at
    /// once. Also whether there were applied writes to commit.
    fn settled(&self, durable: bool) -> Result<(MutexGuard<'_, Uncommitted>, bool), KvError> {
        let mut uncommitted = self.lock_without_long_batch();
        let committed = self.commit_applied(&mut uncommitted, durable)?;
        Ok((uncommitted, committed))
    }

    fn long_batch_done(&self) {
        let mut uncommitted = self.lock_uncommitted();
        if matches!(*uncommitted, Uncommitted::LongBatch) {
            *uncommitted = Uncommitted::None;
        }
        self.long_batch_done.notify_all();
    }

    /// Commits the applied writes not committed yet, if any; durably if `durable`.
    fn commit_applied(&self, uncommitted: &mut Uncommitted, durable: bool) -> Result<bool, KvError> {
        match std::mem::replace(uncommitted, Uncommitted::None) {
            Uncommitted::None => Ok(false),
            Uncommitted::LongBatch => {
                *uncommitted = Uncommitted::LongBatch;
                Ok(false)
            }
            Uncommitted::Batch(mut batch) => {
                let committed = if durable { batch.commit_durably() } else { Ok(()) };
                match committed.and_then(|()| self.observed(|| batch.commit())) {
                    Ok(_) => Ok(true),
                    Err(e) => {
                        *uncommitted = Uncommitted::Lost;
                        Err(e)
                    }
                }
            }
            Uncommitted::Lost => {
                *uncommitted = Uncommitted::Lost;
                Err(KvError::Lost)
            }
        }
    }

    /// Runs `commit`, telling the observer how long it took.
    fn observed<T>(&self, commit: impl FnOnce() -> Result<T, KvError>) -> Result<T, KvError> {
        let started = Instant::now();
        let committed = commit()?;
        if let Some(observer) = self.commit_observer.get() {
            observer(started.elapsed());
        }
        Ok(committed)
    }

    /// Callers commit the applied writes first: redb would wait for their transaction.
    fn begin_write(&self, durable: bool) -> Result<WriteBatch, KvError> {
        let mut txn = self.db().begin_write().map_err(storage)?;
        if !durable {
            txn.set_durability(Durability::None).map_err(storage)?;
        }
        let revision = read_i64(&txn.open_table(META).map_err(storage)?, META_REVISION)?;
        Ok(WriteBatch {
            txn,
            revision,
            changed: false,
            events: Vec::new(),
            previous_values: true,
            slots: (revision, 0),
            durable,
            written: 0,
        })
    }
}

fn read_i64(table: &impl ReadableTable<&'static str, &'static [u8]>, name: &str) -> Result<i64, KvError> {
    let value = table.get(name).map_err(storage)?;
    let bytes: [u8; 8] = value.as_ref().and_then(|v| v.value().try_into().ok()).ok_or_else(|| {
        KvError::Corrupt { key: name.as_bytes().to_vec(), reason: "missing meta value".to_owned() }
    })?;
    Ok(i64::from_be_bytes(bytes))
}

pub(super) fn decode(key: &[u8], bytes: &[u8]) -> Result<KeyValue, KvError> {
    KeyValue::decode(bytes).map_err(|e| KvError::Corrupt { key: key.to_vec(), reason: e.to_string() })
}

/// The tables, and the revisions of an empty store; changes nothing in a store that has them,
/// but for one of an earlier layout, whose history it moves into VERSIONS and VALUES.
fn initialize(db: &Database) -> Result<(), KvError> {
    let txn = db.begin_write().map_err(storage)?;
    // Both said which keys live, which VERSIONS says now.
    txn.delete_table(OLD_LIVE).map_err(storage)?;
    txn.delete_table(OLD_LIVE_REVISIONS).map_err(storage)?;
    convert_old_history(&txn)?;
    {
        txn.open_table(VERSIONS).map_err(storage)?;
        txn.open_table(VALUES).map_err(storage)?;
        txn.open_table(LEASES).map_err(storage)?;
        txn.open_table(LEASE_KEYS).map_err(storage)?;
        let mut meta = txn.open_table(META).map_err(storage)?;
        // etcd starts at revision 1 with an empty store; the first write is revision 2.
        if meta.get(META_REVISION).map_err(storage)?.is_none() {
            meta.insert(META_REVISION, 1i64.to_be_bytes().as_slice()).map_err(storage)?;
            meta.insert(META_COMPACT_REVISION, 0i64.to_be_bytes().as_slice()).map_err(storage)?;
        }
    }
    txn.commit().map_err(storage)
}

/// Moves the rows of the earlier layout's history, whole key-values, into VERSIONS and VALUES.
fn convert_old_history(txn: &WriteTransaction) -> Result<(), KvError> {
    {
        let old = txn.open_table(OLD_HISTORY).map_err(storage)?;
        let mut restoring = Restoring::open(txn)?;
        for row in old.iter().map_err(storage)? {
            let (k, v) = row.map_err(storage)?;
            let (key, revision) = k.value();
            restoring.insert(key, revision, &decode(key, v.value())?)?;
        }
    }
    txn.delete_table(OLD_HISTORY).map_err(storage)?;
    Ok(())
}

/// Makes an empty store at `path` all at once: initialized and synced under `<path>.creating`
/// (what an interrupted try left there is started over), then renamed into place.
fn create(path: &Path) -> Result<(), KvError> {
    let io = |e: std::io::Error| KvError::Storage(redb::Error::Io(e));
    let mut creating = path.as_os_str().to_owned();
    creating.push(".creating");
    let creating = std::path::PathBuf::from(creating);
    match std::fs::remove_file(&creating) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        _ => {}
    }
    initialize(&Database::create(&creating).map_err(storage)?)?;
    crate::failpoint::eval("store-created").map_err(io)?;
    std::fs::rename(&creating, path).map_err(io)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)
}

/// Which keys a request covers, as etcd defines it: `range_end` empty means the single
/// `key`; `range_end == [0]` means every key from `key` on; otherwise `[key, range_end)`.
#[derive(Debug, Clone, Copy)]
pub struct KeySpan<'a> {
    pub key: &'a [u8],
    pub range_end: &'a [u8],
}

impl KeySpan<'_> {
    pub(super) fn is_single(&self) -> bool {
        self.range_end.is_empty()
    }

    pub fn contains(&self, candidate: &[u8]) -> bool {
        if self.is_single() {
            return candidate == self.key;
        }
        candidate >= self.key && (self.range_end == [0] || candidate < self.range_end)
    }

    pub(super) fn upper(&self) -> Option<&[u8]> {
        if self.range_end == [0] { None } else { Some(self.range_end) }
    }
}

/// A range read as etcd's `RangeRequest` describes it (without sorting, which the API layer does).
#[derive(Debug, Clone, Copy)]
pub struct RangeRequestSpec<'a> {
    pub span: KeySpan<'a>,
    /// Read at this revision; 0 or less reads the latest.
    pub revision: i64,
    /// At most this many keys (0: no limit); `count` still counts them all.
    pub limit: usize,
    pub returned: Returned,
}

/// What a range returns of the keys it counts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Returned {
    /// Their key-values.
    KeyValues,
    /// Their key-values with the values left empty: no value is read.
    Keys,
    /// Nothing: the keys are counted, and neither copied nor read. `more` stays false, as
    /// etcd's does for a count-only range.
    Count,
}

#[derive(Debug, Default, PartialEq)]
pub struct RangeResult {
    pub kvs: Vec<KeyValue>,
    /// All keys in the range, not only those returned.
    pub count: i64,
    pub more: bool,
    /// The store's revision when the read was served (the response header's revision).
    pub revision: i64,
}

/// A consistent snapshot of the store for reads.
pub struct ReadView {
    pub(super) txn: ReadTransaction,
}

impl ReadView {
    pub fn revision(&self) -> Result<i64, KvError> {
        read_i64(&self.txn.open_table(META).map_err(storage)?, META_REVISION)
    }

    pub fn compact_revision(&self) -> Result<i64, KvError> {
        read_i64(&self.txn.open_table(META).map_err(storage)?, META_COMPACT_REVISION)
    }

    pub fn range(&self, spec: &RangeRequestSpec<'_>) -> Result<RangeResult, KvError> {
        let versions = self.txn.open_table(VERSIONS).map_err(storage)?;
        let values = self.txn.open_table(VALUES).map_err(storage)?;
        range_in(&versions, &values, self.revision()?, self.compact_revision()?, spec)
    }
}

/// Every key there is: from the empty key to the end of the key space.
const EVERY_KEY: KeySpan<'static> = KeySpan { key: &[], range_end: &[0] };

/// VERSIONS or VALUES, in a read or a write transaction.
trait VersionsTable: ReadableTable<(&'static [u8], i64), &'static [u8]> {}
impl<T: ReadableTable<(&'static [u8], i64), &'static [u8]>> VersionsTable for T {}
trait ValuesTable: ReadableTable<(i64, u32), &'static [u8]> {}
impl<T: ReadableTable<(i64, u32), &'static [u8]>> ValuesTable for T {}

/// A range over the tables of a read or a write transaction (a Txn's reads see its own
/// earlier writes, as etcd's do).
fn range_in(
    versions: &impl VersionsTable,
    values: &impl ValuesTable,
    current: i64,
    compacted: i64,
    spec: &RangeRequestSpec<'_>,
) -> Result<RangeResult, KvError> {
    check_revision(spec.revision, current, compacted)?;
    let mut result = RangeResult { revision: current, ..RangeResult::default() };
    // The latest is the store's revision, not whatever rows there are: a large DeleteRange
    // commits its tombstones in steps (`Applying::delete_range`) and moves the revision with
    // its last one, so readers see all of it or none.
    let at = if spec.revision <= 0 { current } else { spec.revision };
    // Only the values returned are read: counting keys past the limit, or answering with
    // keys alone, reads none.
    for_each_live(versions, spec.span, at, |key, revision, version| {
        result.count += 1;
        if spec.returned == Returned::Count {
            return Ok(());
        }
        if spec.limit == 0 || result.kvs.len() < spec.limit {
            result.kvs.push(version.read(values, key, revision, spec.returned == Returned::KeyValues)?);
        } else {
            result.more = true;
        }
        Ok(())
    })?;
    Ok(result)
}

/// Whether a read at `revision` (0 or less: the latest) can be served.
pub fn check_revision(revision: i64, current: i64, compacted: i64) -> Result<(), KvError> {
    if revision > current {
        return Err(KvError::FutureRevision);
    }
    if revision > 0 && revision < compacted {
        return Err(KvError::Compacted { compact_revision: compacted });
    }
    Ok(())
}

fn lease_keys_of(
    table: &impl ReadableTable<(i64, &'static [u8]), ()>,
    id: i64,
) -> Result<Vec<Vec<u8>>, KvError> {
    let mut keys = Vec::new();
    for row in table.range((id, [].as_slice())..).map_err(storage)? {
        let (k, _) = row.map_err(storage)?;
        let (lease, key) = k.value();
        if lease != id {
            break;
        }
        keys.push(key.to_vec());
    }
    Ok(keys)
}

/// A row of VERSIONS: what etcd's `KeyValue` says of a version besides its key and mod
/// revision (the row's key) and its value (in VALUES under the mod revision and `value_slot`).
/// A deletion is version 0, with nothing else and no value.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Version {
    create_revision: i64,
    version: i64,
    lease: i64,
    value_slot: u32,
}

const VERSION_LEN: usize = 28;

impl Version {
    const DELETION: Version = Version { create_revision: 0, version: 0, lease: 0, value_slot: 0 };

    fn is_live(&self) -> bool {
        self.version > 0
    }

    fn encode(&self) -> [u8; VERSION_LEN] {
        let mut bytes = [0u8; VERSION_LEN];
        bytes[..8].copy_from_slice(&self.create_revision.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.version.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.lease.to_le_bytes());
        bytes[24..].copy_from_slice(&self.value_slot.to_le_bytes());
        bytes
    }

    fn decode(key: &[u8], bytes: &[u8]) -> Result<Self, KvError> {
        let bytes: &[u8; VERSION_LEN] = bytes.try_into().map_err(|_| KvError::Corrupt {
            key: key.to_vec(),
            reason: format!("a version record of {} bytes, not {VERSION_LEN}", bytes.len()),
        })?;
        let i64_at = |at: usize| i64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        Ok(Version {
            create_revision: i64_at(0),
            version: i64_at(8),
            lease: i64_at(16),
            value_slot: u32::from_le_bytes(bytes[24..].try_into().expect("4 bytes")),
        })
    }

    /// The whole key-value of this version of `key`, its value read from `values`.
    fn key_value(&self, values: &impl ValuesTable, key: &[u8], revision: i64) -> Result<KeyValue, KvError> {
        let mut kv = self.without_value(key, revision);
        if self.is_live() {
            let value = values.get((revision, self.value_slot)).map_err(storage)?.ok_or_else(|| {
                KvError::Corrupt {
                    key: key.to_vec(),
                    reason: format!("no value for its version at revision {revision}"),
                }
            })?;
            kv.value = value.value().to_vec();
        }
        Ok(kv)
    }

    /// This version of `key` without reading its value: the value is left empty.
    fn without_value(&self, key: &[u8], revision: i64) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            create_revision: self.create_revision,
            mod_revision: revision,
            version: self.version,
            value: Vec::new(),
            lease: self.lease,
        }
    }

    /// This version of `key`, with its value only when `with_value`.
    fn read(
        &self,
        values: &impl ValuesTable,
        key: &[u8],
        revision: i64,
        with_value: bool,
    ) -> Result<KeyValue, KvError> {
        if with_value { self.key_value(values, key, revision) } else { Ok(self.without_value(key, revision)) }
    }
}

/// The newest version of `key` at or before `revision`, with its revision.
fn newest(
    versions: &impl VersionsTable,
    key: &[u8],
    revision: i64,
) -> Result<Option<(i64, Version)>, KvError> {
    let first: (&[u8], i64) = (key, i64::MIN);
    let last: (&[u8], i64) = (key, revision);
    match versions.range(first..=last).map_err(storage)?.next_back() {
        Some(row) => {
            let (k, v) = row.map_err(storage)?;
            Ok(Some((k.value().1, Version::decode(key, v.value())?)))
        }
        None => Ok(None),
    }
}

/// Every row of VERSIONS for the keys in `span`, in (key, revision) order.
fn for_each_version(
    versions: &impl VersionsTable,
    span: KeySpan<'_>,
    mut visit: impl FnMut(&[u8], i64, Version) -> Result<(), KvError>,
) -> Result<(), KvError> {
    let start: (&[u8], i64) = (span.key, i64::MIN);
    for row in versions.range(start..).map_err(storage)? {
        let (k, v) = row.map_err(storage)?;
        let (key, revision) = k.value();
        if !span.contains(key) {
            if span.is_single() || span.upper().is_some_and(|end| key >= end) {
                break;
            }
            continue;
        }
        visit(key, revision, Version::decode(key, v.value())?)?;
    }
    Ok(())
}

/// The version of every key in `span` that was live at `revision`, in key order: the newest at
/// or before it, unless that is a deletion. Values are not read: `visit` reads those it needs.
fn for_each_live(
    versions: &impl VersionsTable,
    span: KeySpan<'_>,
    revision: i64,
    mut visit: impl FnMut(&[u8], i64, Version) -> Result<(), KvError>,
) -> Result<(), KvError> {
    if span.is_single() {
        if let Some((at, version)) = newest(versions, span.key, revision)?
            && version.is_live()
        {
            visit(span.key, at, version)?;
        }
        return Ok(());
    }
    if span.upper().is_some_and(|end| end <= span.key) {
        return Ok(());
    }
    // The newest version by `revision` of the key being scanned; a key's rows come oldest first.
    let mut current: Option<(Vec<u8>, i64, Version)> = None;
    let mut finish = |done: Option<(Vec<u8>, i64, Version)>| match done {
        Some((key, at, version)) if version.is_live() => visit(&key, at, version),
        _ => Ok(()),
    };
    for_each_version(versions, span, |key, at, version| {
        match current.as_mut() {
            Some((k, _, _)) if k.as_slice() == key => {}
            _ => {
                finish(current.take())?;
                current = Some((key.to_vec(), i64::MIN, Version::DELETION));
            }
        }
        if at <= revision
            && let Some(newest) = current.as_mut()
        {
            (newest.1, newest.2) = (at, version);
        }
        Ok(())
    })?;
    finish(current)
}

/// Writes whole key-values, as snapshots and earlier layouts hold them, into VERSIONS and
/// VALUES. Their rows come in (key, revision) order, so the puts of one revision are counted
/// here to give each its own value slot.
struct Restoring<'txn> {
    versions: redb::Table<'txn, (&'static [u8], i64), &'static [u8]>,
    values: redb::Table<'txn, (i64, u32), &'static [u8]>,
    slots: std::collections::HashMap<i64, u32>,
}

impl<'txn> Restoring<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, KvError> {
        Ok(Restoring {
            versions: txn.open_table(VERSIONS).map_err(storage)?,
            values: txn.open_table(VALUES).map_err(storage)?,
            slots: std::collections::HashMap::new(),
        })
    }

    fn insert(&mut self, key: &[u8], revision: i64, kv: &KeyValue) -> Result<(), KvError> {
        let version = if kv.version > 0 {
            let slot = self.slots.entry(revision).or_insert(0);
            let version = Version {
                create_revision: kv.create_revision,
                version: kv.version,
                lease: kv.lease,
                value_slot: *slot,
            };
            *slot += 1;
            self.values.insert((revision, version.value_slot), kv.value.as_slice()).map_err(storage)?;
            version
        } else {
            Version::DELETION
        };
        self.versions.insert((key, revision), version.encode().as_slice()).map_err(storage)?;
        Ok(())
    }
}

/// Writes applied atomically; one Raft entry that changes anything is one revision.
pub struct WriteBatch {
    txn: WriteTransaction,
    revision: i64,
    changed: bool,
    /// What watchers are told once the batch commits, in the order the writes were made.
    events: Vec<Event>,
    /// Whether every event carries the value it replaced (`prev_kv`): only watchers that ask
    /// for `prev_kv` need them, and a large DeleteRange would read every value it deletes.
    /// Otherwise a replaced version's value is read only when its request asks for it.
    previous_values: bool,
    /// The revision of the last put and how many puts it has had: its puts' value slots.
    slots: (i64, u32),
    /// Whether the commit returns only once the batch is on disk.
    durable: bool,
    /// Bytes of keys and values put since `Applying::finish` last counted them.
    written: u64,
}

/// The batch entries are being applied to (`MvccStore::applying`). Dropped without `finish`
/// (an error or a panic while applying), it loses its writes; if it held earlier batches'
/// uncommitted writes, the store serves nothing more: see `Uncommitted::Lost`.
pub struct Applying<'a> {
    store: &'a MvccStore,
    /// Held while brief entries apply, holding off readers and writers; none while a batch
    /// that may take long applies (`Uncommitted::LongBatch`).
    uncommitted: Option<MutexGuard<'a, Uncommitted>>,
    batch: Option<Box<WriteBatch>>,
}

impl Drop for Applying<'_> {
    fn drop(&mut self) {
        if self.uncommitted.is_none() {
            // Its write transaction ends first (aborted if not committed): what waited for it
            // begins one next.
            self.batch = None;
            self.store.long_batch_done();
        }
    }
}

impl Applying<'_> {
    pub fn batch(&mut self) -> &mut WriteBatch {
        self.batch.as_mut().expect("a batch until finished")
    }

    /// Ends the application, handing back the events for watchers and, if the batch was
    /// committed, how long that took. A batch of brief entries is left for whatever needs it
    /// committed, unless it was made durable (`WriteBatch::commit_durably`); readers are let
    /// in now and see it.
    pub fn finish(mut self) -> Result<(Vec<Event>, Option<Duration>), KvError> {
        let mut batch = self.batch.take().expect("finished once");
        self.store.bytes_not_durable.fetch_add(std::mem::take(&mut batch.written), Ordering::Relaxed);
        match self.uncommitted.as_mut() {
            Some(uncommitted) if !batch.durable => {
                let events = std::mem::take(&mut batch.events);
                **uncommitted = Uncommitted::Batch(batch);
                Ok((events, None))
            }
            _ => {
                let started = Instant::now();
                let events = self.store.observed(|| batch.commit())?;
                if let Some(uncommitted) = self.uncommitted.as_mut() {
                    **uncommitted = Uncommitted::None;
                }
                Ok((events, Some(started.elapsed())))
            }
        }
    }
}

/// Tombstones a DeleteRange writes per durable commit when it deletes more keys than this.
/// Its tombstone rows go beside every key it deletes, so the pages of the versions tree they
/// touch are all copied; redb reuses a page only after a durable commit that no longer
/// needs it, so deleting 150,000 keys in one commit grew the file by the whole tree (about
/// 100 MB after `check perf --load=l`), and in steps it grows by a step's share.
const DELETE_STEP_KEYS: usize = 4096;

impl Applying<'_> {
    /// Applies a DeleteRange request of its own at `revision` (a Txn's deletes go through
    /// `WriteBatch::delete_range`), returning its events as `WriteBatch::delete_range` does.
    ///
    /// In a batch that may take long, more than `DELETE_STEP_KEYS` tombstones are written
    /// in steps, each committed durably with the store's revision still the one before:
    /// readers and snapshots, which go by that revision, see none of the delete until its
    /// last step commits with the rest of the batch. The caller has recorded the entries
    /// before this one as applied (and not this one), so after a crash between steps this
    /// entry is applied again; it then deletes the keys live before `revision`, the same
    /// ones, and writes every tombstone again. Leases lose their keys in the last step only,
    /// so that no step leaves a live key out of its lease's keys.
    ///
    /// The entries of the batch before this one are committed with the first step, before
    /// their answers and watch events go out at the end of the batch: readers may see them
    /// first (as they may see any applied write before its client hears back), and a watch
    /// progress request waits for the batch, since the watchers' feed has not reached them.
    /// Pages a reader still holds (a snapshot being built) are not reused by later steps.
    pub fn delete_range(
        &mut self,
        revision: i64,
        span: KeySpan<'_>,
        previous_values: bool,
    ) -> Result<&[Event], KvError> {
        let in_steps = self.uncommitted.is_none();
        let batch = self.batch();
        let (first, before) = (batch.events.len(), revision - 1);
        let deleted = batch.live_in(span, before, previous_values)?;
        let mut rest = deleted.as_slice();
        while in_steps && rest.len() > DELETE_STEP_KEYS {
            let (step, later) = rest.split_at(DELETE_STEP_KEYS);
            self.batch().write_tombstones(revision, step)?;
            self.commit_step(before)?;
            rest = later;
        }
        self.batch().write_tombstones(revision, rest)?;
        let batch = self.batch();
        batch.record_deletions(revision, deleted)?;
        Ok(&batch.events[first..])
    }

    /// Commits durably what the batch holds, with the store's revision at `revision`, and
    /// goes on in a new write transaction. Only a batch that may take long has one to itself.
    fn commit_step(&mut self, revision: i64) -> Result<(), KvError> {
        let WriteBatch { mut txn, revision: at, changed, events, previous_values, slots, durable, written } =
            *self.batch.take().expect("a batch until finished");
        txn.open_table(META)
            .map_err(storage)?
            .insert(META_REVISION, revision.to_be_bytes().as_slice())
            .map_err(storage)?;
        txn.set_durability(Durability::Immediate).map_err(storage)?;
        self.store.observed(|| txn.commit().map_err(storage))?;
        crate::failpoint::eval("delete-step-committed").map_err(|e| KvError::Storage(redb::Error::Io(e)))?;
        let mut txn = self.store.db().begin_write().map_err(storage)?;
        if !durable {
            txn.set_durability(Durability::None).map_err(storage)?;
        }
        let batch =
            WriteBatch { txn, revision: at, changed, events, previous_values, slots, durable, written };
        self.batch = Some(Box::new(batch));
        Ok(())
    }
}

impl WriteBatch {
    /// The revision the store is at, counting writes of this batch that are already done.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Starts the changes of one request: they all share the next revision.
    pub fn next_revision(&mut self) -> i64 {
        self.revision + 1
    }

    /// Whether the events of this batch carry the values their writes replaced (by default
    /// they do): see `previous_values`.
    pub fn set_previous_values(&mut self, carried: bool) {
        self.previous_values = carried;
    }

    /// Puts `key` at `revision` (from `next_revision`) and returns the version it replaced,
    /// with its value if `previous_value` or the batch carries previous values.
    pub fn put(
        &mut self,
        revision: i64,
        key: &[u8],
        value: &[u8],
        lease: i64,
        previous_value: bool,
    ) -> Result<Option<KeyValue>, KvError> {
        let previous = self.write_put(revision, key, value, lease, previous_value || self.previous_values)?;
        self.bump(revision);
        Ok(previous)
    }

    fn write_put(
        &mut self,
        revision: i64,
        key: &[u8],
        value: &[u8],
        lease: i64,
        previous_value: bool,
    ) -> Result<Option<KeyValue>, KvError> {
        let value_slot = self.next_value_slot(revision);
        self.written += (key.len() + value.len()) as u64;
        let mut versions = self.txn.open_table(VERSIONS).map_err(storage)?;
        let mut values = self.txn.open_table(VALUES).map_err(storage)?;
        let previous = match newest(&versions, key, i64::MAX)? {
            Some((at, version)) if version.is_live() => {
                Some(version.read(&values, key, at, previous_value)?)
            }
            _ => None,
        };
        let version = Version {
            create_revision: previous.as_ref().map_or(revision, |p| p.create_revision),
            version: previous.as_ref().map_or(1, |p| p.version + 1),
            lease,
            value_slot,
        };
        let mut lease_keys = self.txn.open_table(LEASE_KEYS).map_err(storage)?;
        if let Some(old) = previous.as_ref().map(|p| p.lease).filter(|&l| l != 0 && l != lease) {
            lease_keys.remove((old, key)).map_err(storage)?;
        }
        if lease != 0 {
            lease_keys.insert((lease, key), ()).map_err(storage)?;
        }
        versions.insert((key, revision), version.encode().as_slice()).map_err(storage)?;
        values.insert((revision, value_slot), value).map_err(storage)?;
        let kv = KeyValue {
            key: key.to_vec(),
            create_revision: version.create_revision,
            mod_revision: revision,
            version: version.version,
            value: value.to_vec(),
            lease,
        };
        self.events.push(Event { r#type: EventType::Put.into(), kv: Some(kv), prev_kv: previous.clone() });
        Ok(previous)
    }

    /// A slot of its own for the value of a put at `revision`: a Txn puts several at one.
    fn next_value_slot(&mut self, revision: i64) -> u32 {
        if self.slots.0 != revision {
            self.slots = (revision, 0);
        }
        let slot = self.slots.1;
        self.slots.1 += 1;
        slot
    }

    /// Deletes every key in `span` at `revision`; returns the events of the deletions, each
    /// with the version it deleted as `prev_kv` (lent, not copied: a DeleteRange may delete
    /// hundreds of thousands of keys), with its value if `previous_values` or the batch
    /// carries previous values. This is a Txn's delete, which sees the Txn's earlier writes;
    /// a DeleteRange request of its own goes through `Applying::delete_range`.
    pub fn delete_range(
        &mut self,
        revision: i64,
        span: KeySpan<'_>,
        previous_values: bool,
    ) -> Result<&[Event], KvError> {
        let first = self.events.len();
        let deleted = self.live_in(span, i64::MAX, previous_values)?;
        self.write_tombstones(revision, &deleted)?;
        self.record_deletions(revision, deleted)?;
        Ok(&self.events[first..])
    }

    /// The live version of every key in `span` as of `revision`, each with its value if
    /// `previous_values` or the batch carries previous values.
    fn live_in(
        &self,
        span: KeySpan<'_>,
        revision: i64,
        previous_values: bool,
    ) -> Result<Vec<KeyValue>, KvError> {
        let versions = self.txn.open_table(VERSIONS).map_err(storage)?;
        let values = self.txn.open_table(VALUES).map_err(storage)?;
        let with_values = previous_values || self.previous_values;
        let mut live = Vec::new();
        for_each_live(&versions, span, revision, |key, at, version| {
            live.push(version.read(&values, key, at, with_values)?);
            Ok(())
        })?;
        Ok(live)
    }

    /// A deletion of each of `deleted` at `revision`, in VERSIONS: writing it again is
    /// harmless, which is what lets a DeleteRange in steps start over after a crash.
    fn write_tombstones(&mut self, revision: i64, deleted: &[KeyValue]) -> Result<(), KvError> {
        let mut versions = self.txn.open_table(VERSIONS).map_err(storage)?;
        let deletion = Version::DELETION.encode();
        for kv in deleted {
            versions.insert((kv.key.as_slice(), revision), deletion.as_slice()).map_err(storage)?;
        }
        Ok(())
    }

    /// The rest of deleting `deleted` at `revision`, once their tombstones are written: the
    /// keys leave their leases, and watchers get an event for each.
    fn record_deletions(&mut self, revision: i64, deleted: Vec<KeyValue>) -> Result<(), KvError> {
        if deleted.is_empty() {
            return Ok(());
        }
        let mut lease_keys = self.txn.open_table(LEASE_KEYS).map_err(storage)?;
        self.events.reserve(deleted.len());
        for kv in deleted {
            if kv.lease != 0 {
                lease_keys.remove((kv.lease, kv.key.as_slice())).map_err(storage)?;
            }
            let tombstone = KeyValue { key: kv.key.clone(), mod_revision: revision, ..KeyValue::default() };
            self.events.push(Event {
                r#type: EventType::Delete.into(),
                kv: Some(tombstone),
                prev_kv: Some(kv),
            });
        }
        drop(lease_keys);
        self.bump(revision);
        Ok(())
    }

    fn bump(&mut self, revision: i64) {
        self.revision = self.revision.max(revision);
        self.changed = true;
    }

    /// The live value of `key`, seeing this batch's own writes.
    pub fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, KvError> {
        let versions = self.txn.open_table(VERSIONS).map_err(storage)?;
        match newest(&versions, key, i64::MAX)? {
            Some((at, version)) if version.is_live() => {
                version.key_value(&self.txn.open_table(VALUES).map_err(storage)?, key, at).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// A range as this batch sees it, its own earlier writes included.
    pub fn range(&self, spec: &RangeRequestSpec<'_>) -> Result<RangeResult, KvError> {
        let versions = self.txn.open_table(VERSIONS).map_err(storage)?;
        let values = self.txn.open_table(VALUES).map_err(storage)?;
        range_in(&versions, &values, self.revision, self.compact_revision()?, spec)
    }

    pub fn compact_revision(&self) -> Result<i64, KvError> {
        read_i64(&self.txn.open_table(META).map_err(storage)?, META_COMPACT_REVISION)
    }

    /// Forgets the history before `revision`: of each key's versions at or before it, only
    /// the newest stays (reads at `revision` still need it), and not even that when it is a
    /// deletion older than `revision`. Does not change the store's revision.
    pub fn compact(&mut self, revision: i64) -> Result<(), KvError> {
        let mut versions = self.txn.open_table(VERSIONS).map_err(storage)?;
        let mut values = self.txn.open_table(VALUES).map_err(storage)?;
        let mut doomed: Vec<(Vec<u8>, i64, Version)> = Vec::new();
        // The newest version at or before `revision` of the key being scanned.
        let mut newest: Option<(Vec<u8>, i64, Version)> = None;
        let finish = |newest: Option<(Vec<u8>, i64, Version)>, doomed: &mut Vec<_>| {
            if let Some((key, at, version)) = newest
                && !version.is_live()
                && at < revision
            {
                doomed.push((key, at, version));
            }
        };
        for row in versions.iter().map_err(storage)? {
            let (k, v) = row.map_err(storage)?;
            let (key, at) = k.value();
            if at > revision {
                continue;
            }
            let version = Version::decode(key, v.value())?;
            match newest.take() {
                Some(previous) if previous.0 == key => doomed.push(previous),
                other => finish(other, &mut doomed),
            }
            newest = Some((key.to_vec(), at, version));
        }
        finish(newest, &mut doomed);
        for (key, at, version) in &doomed {
            versions.remove((key.as_slice(), *at)).map_err(storage)?;
            if version.is_live() {
                values.remove((*at, version.value_slot)).map_err(storage)?;
            }
        }
        drop((versions, values));
        self.set_meta(META_COMPACT_REVISION, &revision.to_be_bytes())
    }

    /// The TTL a lease was granted with, if it exists.
    pub fn lease_ttl(&self, id: i64) -> Result<Option<i64>, KvError> {
        let leases = self.txn.open_table(LEASES).map_err(storage)?;
        Ok(leases.get(id).map_err(storage)?.map(|v| v.value()))
    }

    pub fn grant_lease(&mut self, id: i64, ttl: i64) -> Result<(), KvError> {
        self.txn.open_table(LEASES).map_err(storage)?.insert(id, ttl).map_err(storage)?;
        Ok(())
    }

    /// Forgets a lease and returns the keys attached to it (the caller deletes them).
    pub fn remove_lease(&mut self, id: i64) -> Result<Vec<Vec<u8>>, KvError> {
        self.txn.open_table(LEASES).map_err(storage)?.remove(id).map_err(storage)?;
        let mut lease_keys = self.txn.open_table(LEASE_KEYS).map_err(storage)?;
        let keys = lease_keys_of(&lease_keys, id)?;
        for key in &keys {
            lease_keys.remove((id, key.as_slice())).map_err(storage)?;
        }
        Ok(keys)
    }

    /// A value stored with `set_meta`, seeing this batch's own writes.
    pub fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, KvError> {
        let meta = self.txn.open_table(META).map_err(storage)?;
        Ok(meta.get(name).map_err(storage)?.map(|v| v.value().to_vec()))
    }

    /// Stores `value` under `name` in the meta table, in the same transaction as the data.
    pub fn set_meta(&mut self, name: &str, value: &[u8]) -> Result<(), KvError> {
        self.txn.open_table(META).map_err(storage)?.insert(name, value).map_err(storage)?;
        Ok(())
    }

    /// How many keys the batch has changed so far.
    pub fn changed_keys(&self) -> usize {
        self.events.len()
    }

    /// Makes the commit durable: it returns once the batch is on disk.
    pub fn commit_durably(&mut self) -> Result<(), KvError> {
        self.txn.set_durability(Durability::Immediate).map_err(storage)?;
        self.durable = true;
        Ok(())
    }

    /// Commits and hands back the batch's events for watchers.
    pub fn commit(mut self) -> Result<Vec<Event>, KvError> {
        if self.changed {
            let revision = self.revision.to_be_bytes();
            self.set_meta(META_REVISION, &revision)?;
        }
        self.txn.commit().map_err(storage)?;
        Ok(self.events)
    }
}

/// Snapshot records: one per version of a key, as a whole key-value under the key and its
/// revision (the layout the store had before VALUES, so that members of either version read
/// each other's snapshots), and one per row of the other tables, framed as `[table: u8][key length: u32][key][value length: u32][value]`, little-endian,
/// then one `END_OF_RECORDS` byte, so that a file may carry padding after the records.
/// (Records written before the marker existed end at the end of the input instead.)
const END_OF_RECORDS: u8 = 0;
/// Rows of the earlier live table, in snapshots made before it was rebuilt on restore: the
/// same key-values as the newest of each key's versions, so restore skips them.
const TABLE_OLD_LIVE: u8 = 1;
const TABLE_HISTORY: u8 = 2;
const TABLE_META: u8 = 3;
const TABLE_LEASES: u8 = 4;
const TABLE_LEASE_KEYS: u8 = 5;

fn write_record(out: &mut impl std::io::Write, table: u8, key: &[u8], value: &[u8]) -> std::io::Result<()> {
    out.write_all(&[table])?;
    out.write_all(&(key.len() as u32).to_le_bytes())?;
    out.write_all(key)?;
    out.write_all(&(value.len() as u32).to_le_bytes())?;
    out.write_all(value)
}

fn read_chunk(input: &mut impl std::io::Read) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    input.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    // Grown as the bytes arrive: a damaged length must not allocate 4 GiB up front.
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(input, u64::from(len)), &mut bytes)?;
    if bytes.len() != len as usize {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(bytes)
}

impl ReadView {
    /// A value stored with `WriteBatch::set_meta`, as of this view.
    pub fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, KvError> {
        let meta = self.txn.open_table(META).map_err(storage)?;
        Ok(meta.get(name).map_err(storage)?.map(|v| v.value().to_vec()))
    }

    /// Every lease with its granted TTL.
    pub fn leases(&self) -> Result<Vec<(i64, i64)>, KvError> {
        let leases = self.txn.open_table(LEASES).map_err(storage)?;
        let mut all = Vec::new();
        for row in leases.iter().map_err(storage)? {
            let (id, ttl) = row.map_err(storage)?;
            all.push((id.value(), ttl.value()));
        }
        Ok(all)
    }

    pub fn lease_ttl(&self, id: i64) -> Result<Option<i64>, KvError> {
        let leases = self.txn.open_table(LEASES).map_err(storage)?;
        Ok(leases.get(id).map_err(storage)?.map(|v| v.value()))
    }

    pub fn lease_keys(&self, id: i64) -> Result<Vec<Vec<u8>>, KvError> {
        lease_keys_of(&self.txn.open_table(LEASE_KEYS).map_err(storage)?, id)
    }

    /// Every version of the keys in `span` at revisions up to `up_to`, deletions included, as
    /// a whole key-value with its key and revision, in (key, revision) order. Values are read
    /// only for the versions visited.
    fn for_each_key_value(
        &self,
        span: KeySpan<'_>,
        up_to: i64,
        mut visit: impl FnMut(&[u8], i64, KeyValue) -> Result<(), KvError>,
    ) -> Result<(), KvError> {
        let versions = self.txn.open_table(VERSIONS).map_err(storage)?;
        let values = self.txn.open_table(VALUES).map_err(storage)?;
        for_each_version(&versions, span, |key, revision, version| {
            if revision > up_to {
                return Ok(());
            }
            visit(key, revision, version.key_value(&values, key, revision)?)
        })
    }

    /// Every version of the keys in `span` at revisions up to `to`, deletions included, as
    /// whole key-values in (key, revision) order.
    pub(super) fn versions(&self, span: KeySpan<'_>, to: i64) -> Result<Vec<KeyValue>, KvError> {
        let mut rows = Vec::new();
        self.for_each_key_value(span, to, |_, _, kv| {
            rows.push(kv);
            Ok(())
        })?;
        Ok(rows)
    }

    /// Writes the whole store as of this view, every revision not yet compacted, as
    /// snapshot records.
    pub fn dump(&self, out: &mut impl std::io::Write) -> Result<(), KvError> {
        let io = |e: std::io::Error| KvError::Storage(redb::Error::Io(e));
        let txn = &self.txn;
        // Up to the view's revision: tombstones a DeleteRange committed in steps before its
        // last (`Applying::delete_range`) are not the store's yet, and the snapshot's last
        // applied entry is the one before that delete, which is applied again after it.
        self.for_each_key_value(EVERY_KEY, self.revision()?, |key, revision, kv| {
            let mut composite = key.to_vec();
            composite.extend_from_slice(&revision.to_be_bytes());
            write_record(out, TABLE_HISTORY, &composite, &kv.encode_to_vec()).map_err(io)
        })?;
        for row in txn.open_table(META).map_err(storage)?.iter().map_err(storage)? {
            let (k, v) = row.map_err(storage)?;
            write_record(out, TABLE_META, k.value().as_bytes(), v.value()).map_err(io)?;
        }
        for row in txn.open_table(LEASES).map_err(storage)?.iter().map_err(storage)? {
            let (id, ttl) = row.map_err(storage)?;
            write_record(out, TABLE_LEASES, &id.value().to_be_bytes(), &ttl.value().to_be_bytes())
                .map_err(io)?;
        }
        for row in txn.open_table(LEASE_KEYS).map_err(storage)?.iter().map_err(storage)? {
            let (k, _) = row.map_err(storage)?;
            let (id, key) = k.value();
            let mut composite = id.to_be_bytes().to_vec();
            composite.extend_from_slice(key);
            write_record(out, TABLE_LEASE_KEYS, &composite, &[]).map_err(io)?;
        }
        out.write_all(&[END_OF_RECORDS]).map_err(io)
    }
}

/// What `ReadView::hash_kv` reports, as etcd's HashKV response carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvHash {
    pub hash: u32,
    /// The revision the hash covers.
    pub revision: i64,
    pub compact_revision: i64,
}

/// Feeds what is written into a CRC-32.
struct Crc32Writer(crc32fast::Hasher);

impl std::io::Write for Crc32Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ReadView {
    /// A CRC-32 of every version of every key (tombstones included) up to `revision` (0 or
    /// less: the view's revision). It covers only what every member holds identically for
    /// the same log: the MVCC key space, none of the Raft bookkeeping beside it, so members
    /// at the same revision agree.
    pub fn hash_kv(&self, revision: i64) -> Result<KvHash, KvError> {
        let current = self.revision()?;
        let compact_revision = self.compact_revision()?;
        let revision = if revision <= 0 { current } else { revision };
        check_revision(revision, current, compact_revision)?;
        let mut hasher = crc32fast::Hasher::new();
        // Rows come in (key, revision) order, the same on every member. Lengths frame each
        // part so that different rows can never hash as the same byte sequence.
        self.for_each_key_value(EVERY_KEY, revision, |key, rev, kv| {
            let encoded = kv.encode_to_vec();
            hasher.update(&(key.len() as u32).to_le_bytes());
            hasher.update(key);
            hasher.update(&rev.to_le_bytes());
            hasher.update(&(encoded.len() as u32).to_le_bytes());
            hasher.update(&encoded);
            Ok(())
        })?;
        Ok(KvHash { hash: hasher.finalize(), revision, compact_revision })
    }

    /// A CRC-32 of the whole store as of this view: every table, Raft bookkeeping included,
    /// as the records a snapshot holds.
    pub fn hash_all(&self) -> Result<u32, KvError> {
        let mut out = Crc32Writer(crc32fast::Hasher::new());
        self.dump(&mut out)?;
        Ok(out.0.finalize())
    }
}

impl MvccStore {
    /// Makes every earlier non-durable commit durable.
    pub fn sync(&self) -> Result<(), KvError> {
        let (_settled, committed) = self.settled(true)?;
        if !committed {
            // Applied writes a reader committed since, not durably.
            self.observed(|| self.db().begin_write().map_err(storage)?.commit().map_err(storage))?;
        }
        // Nothing applies while `_settled` is held.
        self.bytes_not_durable.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// Bytes of keys and values applied since the last durable commit (`sync`): the pages
    /// that commit will write grow with them.
    pub fn bytes_not_durable(&self) -> u64 {
        self.bytes_not_durable.load(Ordering::Relaxed)
    }

    /// Bytes of the database file that hold data (allocated pages); the rest is free space
    /// `defragment` can give back. Waits for a running write transaction, as redb reports
    /// page statistics only from inside one.
    pub fn size_in_use(&self) -> Result<u64, KvError> {
        let _settled = self.settled(false)?;
        let txn = self.db().begin_write().map_err(storage)?;
        let stats = txn.stats().map_err(storage)?;
        txn.abort().map_err(storage)?;
        Ok(stats.allocated_pages() * stats.page_size() as u64)
    }

    /// Rewrites the database file compactly and shrinks it. New transactions wait while it
    /// runs; it waits for open ones to end (retrying, as redb refuses to compact under an
    /// open transaction) and gives up with `KvError::Busy` after `DEFRAGMENT_PATIENCE`.
    pub fn defragment(&self) -> Result<(), KvError> {
        let deadline = Instant::now() + DEFRAGMENT_PATIENCE;
        loop {
            {
                let _settled = self.settled(false)?;
                let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
                match db.compact() {
                    Ok(_) => return Ok(()),
                    Err(redb::CompactionError::TransactionInProgress) => {}
                    Err(e) => return Err(storage(e)),
                }
            }
            // The lock is released here, so the transactions being waited for can finish.
            if Instant::now() >= deadline {
                return Err(KvError::Busy);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Replaces the whole store with the records in `input`, atomically and durably: a
    /// crash leaves either the old store or the new one.
    pub fn restore(&self, input: &mut impl std::io::Read) -> Result<(), KvError> {
        let malformed =
            |what: &str| KvError::Corrupt { key: Vec::new(), reason: format!("snapshot: {what}") };
        let _settled = self.settled(false)?;
        let txn = self.db().begin_write().map_err(storage)?;
        txn.delete_table(VERSIONS).map_err(storage)?;
        txn.delete_table(VALUES).map_err(storage)?;
        txn.delete_table(META).map_err(storage)?;
        txn.delete_table(LEASES).map_err(storage)?;
        txn.delete_table(LEASE_KEYS).map_err(storage)?;
        {
            let mut restoring = Restoring::open(&txn)?;
            let mut meta = txn.open_table(META).map_err(storage)?;
            let mut leases = txn.open_table(LEASES).map_err(storage)?;
            let mut lease_keys = txn.open_table(LEASE_KEYS).map_err(storage)?;
            // The newest version among the records: a snapshot holds none past its revision.
            let mut newest = i64::MIN;
            let lease_id = |bytes: &[u8]| -> Result<i64, KvError> {
                Ok(i64::from_be_bytes(
                    bytes.get(..8).and_then(|b| b.try_into().ok()).ok_or_else(|| malformed("lease id"))?,
                ))
            };
            loop {
                let mut table = [0u8; 1];
                match input.read_exact(&mut table) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(KvError::Storage(redb::Error::Io(e))),
                }
                if table[0] == END_OF_RECORDS {
                    break;
                }
                let key = read_chunk(input).map_err(|_| malformed("truncated record"))?;
                let value = read_chunk(input).map_err(|_| malformed("truncated record"))?;
                match table[0] {
                    TABLE_OLD_LIVE => {}
                    TABLE_HISTORY => {
                        let split = key.len().checked_sub(8).ok_or_else(|| malformed("short history key"))?;
                        let (user_key, revision) = key.split_at(split);
                        let revision =
                            i64::from_be_bytes(revision.try_into().map_err(|_| malformed("revision"))?);
                        restoring.insert(user_key, revision, &decode(user_key, &value)?)?;
                        newest = newest.max(revision);
                    }
                    TABLE_META => {
                        let name = std::str::from_utf8(&key).map_err(|_| malformed("meta name"))?;
                        meta.insert(name, value.as_slice()).map_err(storage)?;
                    }
                    TABLE_LEASES => {
                        leases.insert(lease_id(&key)?, lease_id(&value)?).map_err(storage)?;
                    }
                    TABLE_LEASE_KEYS => {
                        lease_keys.insert((lease_id(&key)?, &key[8..]), ()).map_err(storage)?;
                    }
                    _ => return Err(malformed("unknown table")),
                }
            }
            // Reads and snapshots go by the store's revision (`range_in`, `ReadView::dump`):
            // without one the store could serve nothing, and versions past it would be
            // neither read nor passed on.
            let revision = read_i64(&meta, META_REVISION).map_err(|_| malformed("no store revision"))?;
            read_i64(&meta, META_COMPACT_REVISION).map_err(|_| malformed("no compacted revision"))?;
            if newest > revision {
                return Err(malformed(&format!(
                    "a version at {newest}, past the store's revision {revision}"
                )));
            }
        }
        txn.commit().map_err(storage)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

    use super::*;

    fn put(store: &MvccStore, key: &str, value: &str) {
        let mut batch = store.write(false).expect("write");
        let revision = batch.next_revision();
        batch.put(revision, key.as_bytes(), value.as_bytes(), 0, false).expect("put");
        batch.commit().expect("commit");
    }

    /// Applies a put of `key` as the state machine does, leaving it uncommitted; its revision.
    fn apply_put(store: &MvccStore, key: &str) -> i64 {
        let mut applying = store.applying(true).expect("applying");
        let batch = applying.batch();
        let revision = batch.next_revision();
        batch.put(revision, key.as_bytes(), b"value", 0, false).expect("put");
        applying.finish().expect("finish");
        revision
    }

    fn scratch(dir: &tempfile::TempDir, name: &str) -> std::path::PathBuf {
        let path = dir.path().join(name);
        std::fs::create_dir(&path).expect("scratch");
        path
    }

    fn keys(view: &ReadView) -> Vec<Vec<u8>> {
        let everything = RangeRequestSpec {
            span: KeySpan { key: b"\0", range_end: b"\0" },
            revision: 0,
            limit: 0,
            returned: Returned::Keys,
        };
        view.range(&everything).expect("range").kvs.into_iter().map(|kv| kv.key).collect()
    }

    #[test]
    fn applied_writes_are_committed_by_whatever_needs_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kv.redb");
        let store = MvccStore::open(&path).expect("open");
        let commits = Arc::new(AtomicUsize::new(0));
        store.observe_commits({
            let commits = commits.clone();
            Box::new(move |_| {
                commits.fetch_add(1, Ordering::SeqCst);
            })
        });

        // Two batches applied, neither committed: a crash would leave neither.
        apply_put(&store, "a");
        let revision = apply_put(&store, "b");
        assert_eq!(commits.load(Ordering::SeqCst), 0);
        let crashed = MvccStore::open_crash_copy(&path, &scratch(&dir, "one"));
        assert!(keys(&crashed.read().expect("read")).is_empty());

        // A read commits both, once, and sees both.
        let view = store.read().expect("read");
        assert_eq!(
            (view.revision().expect("revision"), keys(&view)),
            (revision, vec![b"a".to_vec(), b"b".to_vec()])
        );
        drop(view);
        store.read().expect("read again");
        assert_eq!(commits.load(Ordering::SeqCst), 1, "the second read had nothing to commit");

        // A write begins after the applied writes, and the durable commit makes them durable.
        apply_put(&store, "c");
        let mut batch = store.write(false).expect("write");
        assert_eq!(batch.next_revision(), revision + 2);
        batch.commit().expect("commit");
        apply_put(&store, "d");
        store.size_in_use().expect("size in use");
        apply_put(&store, "e");
        // Five keys of a byte applied with their values, none durably: reads commit without.
        assert_eq!(store.bytes_not_durable(), 5 * (1 + "value".len() as u64));
        store.sync().expect("sync");
        assert_eq!(store.bytes_not_durable(), 0);
        let crashed = MvccStore::open_crash_copy(&path, &scratch(&dir, "two"));
        assert_eq!(keys(&crashed.read().expect("read")).len(), 5);

        // Defragmentation, which redb refuses under an open transaction, commits them first.
        apply_put(&store, "f");
        store.defragment().expect("defragment");
        assert_eq!(keys(&store.read().expect("read")).len(), 6);
    }

    #[test]
    fn a_reader_sees_every_write_applied_before_it_began() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(MvccStore::open(&dir.path().join("kv.redb")).expect("open"));
        let answered = Arc::new(AtomicI64::new(0));
        let applier = std::thread::spawn({
            let (store, answered) = (store.clone(), answered.clone());
            move || {
                for i in 0..2000 {
                    let revision = apply_put(&store, &format!("key/{i}"));
                    answered.store(revision, Ordering::SeqCst);
                }
            }
        });
        let mut reads = 0;
        while !applier.is_finished() {
            let before = answered.load(Ordering::SeqCst);
            let seen = store.read().expect("read").revision().expect("revision");
            assert!(seen >= before, "a read that began after revision {before} was answered saw {seen}");
            reads += 1;
        }
        applier.join().expect("applier");
        assert!(reads > 0);
        assert_eq!(store.read().expect("read").revision().expect("revision"), 2001);
    }

    #[test]
    fn brief_entries_are_applied_at_once_only_while_no_one_commits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = MvccStore::open(&dir.path().join("kv.redb")).expect("open");
        let committing = store.lock_uncommitted();
        assert!(store.try_applying_briefly().expect("try").is_none());
        drop(committing);
        let mut applying = store.try_applying_briefly().expect("try").expect("free");
        let revision = applying.batch().next_revision();
        applying.batch().put(revision, b"k", b"v", 0, false).expect("put");
        applying.finish().expect("finish");
        assert_eq!(keys(&store.read().expect("read")), vec![b"k".to_vec()]);
    }

    #[test]
    fn readers_need_not_wait_for_a_batch_that_may_take_long() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(MvccStore::open(&dir.path().join("kv.redb")).expect("open"));
        apply_put(&store, "answered");
        let mut long = store.applying(false).expect("applying");
        let revision = long.batch().next_revision();
        long.batch().put(revision, b"applying", b"value", 0, false).expect("put");

        // A durable commit comes meanwhile: it waits for the batch, and readers wait for neither.
        let (synced, sync_done) = std::sync::mpsc::channel();
        std::thread::spawn({
            let store = store.clone();
            move || synced.send(store.sync().is_ok())
        });
        let (seen, read) = std::sync::mpsc::channel();
        for _ in 0..2 {
            std::thread::spawn({
                let (store, seen) = (store.clone(), seen.clone());
                move || seen.send(keys(&store.read().expect("read")))
            });
            let seen = read.recv_timeout(Duration::from_secs(10)).expect("a read while the batch applies");
            assert_eq!(seen, vec![b"answered".to_vec()]);
        }
        assert!(sync_done.try_recv().is_err(), "the durable commit waits for the batch");

        let (_, committed) = long.finish().expect("finish");
        assert!(committed.is_some());
        assert!(
            sync_done.recv_timeout(Duration::from_secs(10)).expect("the durable commit, after the batch")
        );
        assert_eq!(keys(&store.read().expect("read")), vec![b"answered".to_vec(), b"applying".to_vec()]);
    }

    #[test]
    fn a_batch_that_fails_while_applying_loses_the_writes_it_carried_and_says_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = MvccStore::open(&dir.path().join("kv.redb")).expect("open");
        apply_put(&store, "committed");
        store.read().expect("read");

        // Nothing uncommitted to lose: the failed batch's own writes are dropped, no more.
        {
            let mut applying = store.applying(true).expect("applying");
            let revision = applying.batch().next_revision();
            applying.batch().put(revision, b"failed", b"value", 0, false).expect("put");
        }
        assert_eq!(keys(&store.read().expect("read")), vec![b"committed".to_vec()]);

        // With an answered write uncommitted, the store refuses to serve what no longer has it.
        apply_put(&store, "answered");
        drop(store.applying(true).expect("applying"));
        assert!(matches!(store.read(), Err(KvError::Lost)));
        assert!(matches!(store.write(false), Err(KvError::Lost)));
        assert!(matches!(store.applying(true), Err(KvError::Lost)));
        assert!(matches!(store.applying(false), Err(KvError::Lost)));
        assert!(matches!(store.sync(), Err(KvError::Lost)));
    }

    /// Takes the value of the first put at `revision` out of the store, as a lost page would:
    /// reading it is then an error, so a read that succeeds did not read it.
    fn lose_value(store: &MvccStore, revision: i64) {
        let txn = store.db().begin_write().expect("write");
        txn.open_table(VALUES).expect("values").remove((revision, 0)).expect("remove").expect("a value");
        txn.commit().expect("commit");
    }

    #[test]
    fn a_store_whose_cache_holds_a_few_pages_reads_back_what_it_wrote() {
        // 16 KiB: four pages, so nearly every read and write of 2,000 keys evicts a page or
        // spills one from redb's write buffer before its commit.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kv.redb");
        let value = |i: usize| format!("{i:0>300}");
        {
            let store = MvccStore::open_with_cache(&path, 16 << 10).expect("open");
            for chunk in (0..2000).collect::<Vec<_>>().chunks(100) {
                let mut batch = store.write(chunk[0] % 500 == 0).expect("write");
                for &i in chunk {
                    let revision = batch.next_revision();
                    batch
                        .put(revision, format!("key/{i:04}").as_bytes(), value(i).as_bytes(), 0, false)
                        .expect("put");
                }
                batch.commit().expect("commit");
            }
            let mut batch = store.write(true).expect("write");
            let revision = batch.next_revision();
            batch
                .delete_range(revision, KeySpan { key: b"key/1", range_end: b"key/2" }, false)
                .expect("delete");
            batch.commit().expect("commit");
        }
        let store = MvccStore::open_with_cache(&path, 16 << 10).expect("reopen");
        let all = store
            .read()
            .expect("view")
            .range(&RangeRequestSpec {
                span: KeySpan { key: b"key/", range_end: b"key0" },
                revision: 0,
                limit: 0,
                returned: Returned::KeyValues,
            })
            .expect("range");
        assert_eq!(all.count, 1000, "the keys 1000-1999 were deleted");
        for (i, kv) in all.kvs.iter().enumerate() {
            assert_eq!(
                (kv.key.as_slice(), kv.value.as_slice()),
                (format!("key/{i:04}").as_bytes(), value(i).as_bytes())
            );
        }
    }

    #[test]
    fn reads_and_writes_read_only_the_values_they_need() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = MvccStore::open(&dir.path().join("kv.redb")).expect("open");
        for (key, value) in [("a", "1"), ("b", "2"), ("c", "3")] {
            put(&store, key, value);
        }
        lose_value(&store, 3);
        let all = KeySpan { key: b"a", range_end: b"d" };
        let range = |limit, returned| {
            store.read().expect("view").range(&RangeRequestSpec { span: all, revision: 0, limit, returned })
        };
        assert!(matches!(range(0, Returned::KeyValues), Err(KvError::Corrupt { .. })), "b's value is gone");
        let first = range(1, Returned::KeyValues).expect("the keys past the limit are counted, not read");
        assert_eq!((first.kvs.len(), first.count, first.more), (1, 3, true));
        let counted = range(1, Returned::Count).expect("counting reads no value");
        assert_eq!((counted.kvs.len(), counted.count, counted.more), (0, 3, false));
        let keys = range(0, Returned::Keys).expect("keys alone read no value");
        assert_eq!(
            keys.kvs.iter().map(|kv| (kv.key.as_slice(), kv.value.len())).collect::<Vec<_>>(),
            [(b"a".as_slice(), 0), (b"b", 0), (b"c", 0)]
        );

        let b = KeySpan { key: b"b", range_end: &[] };
        // A batch carries previous values unless told otherwise; a request may ask for them.
        let mut batch = store.write(false).expect("write");
        assert!(matches!(batch.delete_range(4, b, false), Err(KvError::Corrupt { .. })));
        drop(batch);
        let mut batch = store.write(false).expect("write");
        batch.set_previous_values(false);
        assert!(matches!(batch.delete_range(4, b, true), Err(KvError::Corrupt { .. })));
        drop(batch);
        let mut batch = store.write(false).expect("write");
        batch.set_previous_values(false);
        let deleted = batch.delete_range(4, b, false).expect("a delete that reads no value");
        let previous = deleted[0].prev_kv.as_ref().expect("the deleted version");
        assert_eq!((previous.mod_revision, previous.version, previous.value.len()), (3, 1, 0));
        let replaced = batch.put(5, b"c", b"4", 0, false).expect("put").expect("the replaced version");
        assert_eq!((replaced.mod_revision, replaced.version, replaced.value.len()), (4, 1, 0));
        let replaced = batch.put(6, b"a", b"5", 0, true).expect("put").expect("the replaced version");
        assert_eq!(replaced.value, b"1");
        batch.commit().expect("commit");
        let after = store.read().expect("view").range(&RangeRequestSpec {
            span: all,
            revision: 0,
            limit: 0,
            returned: Returned::KeyValues,
        });
        assert_eq!(
            after
                .expect("range")
                .kvs
                .iter()
                .map(|kv| (kv.key.as_slice(), kv.value.as_slice()))
                .collect::<Vec<_>>(),
            [(b"a".as_slice(), b"5".as_slice()), (b"c", b"4")]
        );
    }

    #[test]
    fn hash_kv_depends_only_on_the_key_space_up_to_the_revision() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = MvccStore::open(&dir.path().join("a")).expect("open");
        let b = MvccStore::open(&dir.path().join("b")).expect("open");
        for store in [&a, &b] {
            put(store, "x", "1");
            put(store, "y", "2");
        }
        // Raft bookkeeping beside the data differs between members; HashKV must not see it.
        let mut batch = a.write(true).expect("write");
        batch.set_meta("raft_applied", b"differs").expect("meta");
        batch.commit().expect("commit");
        put(&b, "z", "3");
        let (va, vb) = (a.read().expect("read"), b.read().expect("read"));
        let at3 = va.hash_kv(3).expect("hash");
        assert_eq!(at3, KvHash { revision: 3, ..vb.hash_kv(3).expect("hash") });
        assert_eq!(va.hash_kv(0).expect("hash"), at3);
        assert_ne!(vb.hash_kv(0).expect("hash").hash, at3.hash);
        assert!(matches!(va.hash_kv(4), Err(KvError::FutureRevision)));
        assert_ne!(va.hash_all().expect("hash"), vb.hash_all().expect("hash"));
    }

    /// Puts, overwrites, a deletion and a compaction: live keys with history before them,
    /// a deleted one, and versions compacted away.
    fn with_history(store: &MvccStore) {
        for (key, value) in [("a", "1"), ("b", "1"), ("a", "2"), ("c", "1"), ("b", "2")] {
            put(store, key, value);
        }
        let mut batch = store.write(false).expect("write");
        let revision = batch.next_revision();
        batch.delete_range(revision, KeySpan { key: b"c", range_end: &[] }, false).expect("delete");
        batch.commit().expect("commit");
        let mut batch = store.write(false).expect("write");
        batch.compact(4).expect("compact");
        batch.commit().expect("commit");
        put(store, "d", "1");
    }

    fn everything(view: &ReadView, revision: i64) -> RangeResult {
        let spec = RangeRequestSpec {
            span: KeySpan { key: &[0], range_end: &[0] },
            revision,
            limit: 0,
            returned: Returned::KeyValues,
        };
        view.range(&spec).expect("range")
    }

    #[test]
    fn a_batch_committed_durably_is_on_disk_when_its_commit_returns() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let store = MvccStore::open(&path).expect("open");
        let small = 100;
        let mut batch = store.write(false).expect("write");
        for i in 0..small {
            batch.put(i + 2, format!("small/{i:05}").as_bytes(), b"v", 0, false).expect("put");
        }
        batch.commit().expect("commit");
        // Not durable yet: that is left to the periodic durable commit.
        let crashed = MvccStore::open_crash_copy(&path, dir.path());
        assert_eq!(everything(&crashed.read().expect("read"), 0).kvs.len(), 0);
        drop(crashed);
        let mut batch = store.write(false).expect("write");
        let deleted = batch
            .delete_range(small + 2, KeySpan { key: b"small/", range_end: b"small0" }, false)
            .expect("delete");
        assert_eq!(deleted.len(), small as usize);
        assert!(deleted.iter().all(|event| event.prev_kv.as_ref().is_some_and(|kv| kv.value == b"v")));
        batch.put(small + 2, b"last", b"v", 0, false).expect("put");
        assert_eq!(batch.changed_keys(), small as usize + 1);
        batch.commit_durably().expect("durably");
        batch.commit().expect("commit");
        let crashed = MvccStore::open_crash_copy(&path, dir.path());
        let view = crashed.read().expect("read");
        assert_eq!(
            everything(&view, 0).kvs.iter().map(|kv| kv.key.as_slice()).collect::<Vec<_>>(),
            [b"last"]
        );
    }

    #[test]
    fn a_put_keeps_its_value_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = MvccStore::open(&dir.path().join("db")).expect("open");
        let value = "v".repeat(60 * 1024);
        let before = store.size_in_use().expect("in use");
        for i in 0..64 {
            put(&store, &format!("k{i:02}"), &value);
        }
        // 3.75 MiB of values (each in a 64 KiB page: redb pages are powers of two); a store that
        // kept each value with its live key too held twice that.
        let grown = store.size_in_use().expect("in use") - before;
        assert!(grown < 6 << 20, "{grown} bytes for 3.75 MiB of values");
        let view = store.read().expect("read");
        assert_eq!(everything(&view, 0).kvs.len(), 64);
    }

    #[test]
    fn a_store_of_an_earlier_layout_opens_with_the_same_versions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let store = MvccStore::open(&path).expect("open");
        with_history(&store);
        let view = store.read().expect("read");
        let (latest, at5, hash, all) = (
            everything(&view, 0),
            everything(&view, 5),
            view.hash_kv(0).expect("hash"),
            view.hash_all().expect("hash"),
        );
        let mut rows = Vec::new();
        view.for_each_key_value(EVERY_KEY, i64::MAX, |key, revision, kv| {
            rows.push((key.to_vec(), revision, kv));
            Ok(())
        })
        .expect("versions");
        drop((view, store));
        // The earlier layouts: each version's whole key-value under (key, revision), with the
        // live keys' revisions or whole key-values beside them. Those went stale when the
        // version before them deleted "c" (put at revision 5): they still say it lives.
        {
            let db = Database::open(&path).expect("open");
            let txn = db.begin_write().expect("write");
            assert!(txn.delete_table(VERSIONS).expect("delete"));
            assert!(txn.delete_table(VALUES).expect("delete"));
            {
                let mut history = txn.open_table(OLD_HISTORY).expect("history");
                for (key, revision, kv) in &rows {
                    history
                        .insert((key.as_slice(), *revision), kv.encode_to_vec().as_slice())
                        .expect("insert");
                }
                let mut live_revisions = txn.open_table(OLD_LIVE_REVISIONS).expect("live revisions");
                let mut live = txn.open_table(OLD_LIVE).expect("live");
                for kv in &latest.kvs {
                    live_revisions.insert(kv.key.as_slice(), kv.mod_revision).expect("insert");
                    live.insert(kv.key.as_slice(), kv.encode_to_vec().as_slice()).expect("insert");
                }
                live_revisions.insert(b"c".as_slice(), 5).expect("stale row");
            }
            txn.commit().expect("commit");
        }
        let store = MvccStore::open(&path).expect("open the earlier layout");
        let view = store.read().expect("read");
        assert_eq!(everything(&view, 0), latest);
        assert_eq!(everything(&view, 5), at5);
        assert_eq!(view.hash_kv(0).expect("hash"), hash);
        assert_eq!(view.hash_all().expect("hash"), all);
        assert_eq!(latest.kvs.iter().map(|kv| kv.key.as_slice()).collect::<Vec<_>>(), [b"a", b"b", b"d"]);
        drop(view);
        let mut batch = store.write(false).expect("write");
        let revision = batch.next_revision();
        let previous = batch.put(revision, b"a", b"3", 0, false).expect("put");
        assert_eq!(previous.map(|kv| (kv.value, kv.version)), Some((b"2".to_vec(), 2)));
        batch.commit().expect("commit");
    }

    #[test]
    fn a_snapshot_that_carries_the_live_key_values_again_restores_the_same_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = MvccStore::open(&dir.path().join("source")).expect("open");
        with_history(&source);
        let view = source.read().expect("read");
        let mut records = Vec::new();
        // As snapshots made before wrote them: the live key-values first, then the rest.
        for kv in everything(&view, 0).kvs {
            write_record(&mut records, TABLE_OLD_LIVE, &kv.key, &kv.encode_to_vec()).expect("record");
        }
        view.dump(&mut records).expect("dump");
        let target = MvccStore::open(&dir.path().join("target")).expect("open");
        put(&target, "stale", "gone after the restore");
        target.restore(&mut records.as_slice()).expect("restore");
        let restored = target.read().expect("read");
        for revision in [0, 5, 6] {
            assert_eq!(everything(&restored, revision), everything(&view, revision), "at {revision}");
        }
        assert_eq!(restored.hash_all().expect("hash"), view.hash_all().expect("hash"));
    }

    #[test]
    fn defragment_waits_for_open_transactions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = std::sync::Arc::new(MvccStore::open(&dir.path().join("db")).expect("open"));
        for i in 0..200 {
            put(&store, &format!("k{i}"), &"v".repeat(1000));
        }
        let view = store.read().expect("read");
        let defragmenting = {
            let store = store.clone();
            std::thread::spawn(move || store.defragment())
        };
        // Defragmentation cannot finish while the view is open; once it closes, it does.
        std::thread::sleep(Duration::from_millis(50));
        assert!(!defragmenting.is_finished());
        assert_eq!(
            view.range(&RangeRequestSpec {
                span: KeySpan { key: b"k1", range_end: &[] },
                revision: 0,
                limit: 0,
                returned: Returned::KeyValues,
            })
            .expect("range")
            .count,
            1
        );
        drop(view);
        defragmenting.join().expect("thread").expect("defragment");
        let view = store.read().expect("read");
        assert_eq!(view.revision().expect("revision"), 201);
        assert!(store.size_in_use().expect("in use") > 200 * 1000);
    }

    /// etcdctl's `check perf` puts, in apply batches of 8: keys of 276 random bytes, values
    /// of 1 KiB. Each value is stored once, appended in revision order where redb packs pages
    /// full; a key's versions are small rows. Stored under each key with its value, as
    /// before, the same puts took 3.2 KB each (leaves 59 % full), and etcd 3.4 took 2.4 KB
    /// per write of this load (its whole file, after its final delete).
    #[test]
    fn check_perfs_puts_take_less_than_two_kilobytes_each() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = MvccStore::open(&dir.path().join("db")).expect("open");
        let before = store.size_in_use().expect("in use");
        let puts = 4096;
        put_check_perf_keys(&store, puts, 8, &[0u8; 1024]);
        let per_put = (store.size_in_use().expect("in use") - before) / puts as u64;
        assert!(per_put < 2048, "{per_put} bytes per put");
    }

    /// Puts `keys` keys shaped as `etcdctl check perf`'s (its prefix, then 256 bytes in random
    /// order), `per_batch` to a batch, each with `value`.
    fn put_check_perf_keys(store: &MvccStore, keys: usize, per_batch: usize, value: &[u8]) {
        let mut random = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..keys / per_batch {
            let mut batch = store.write(false).expect("write");
            for _ in 0..per_batch {
                random ^= random << 13;
                random ^= random >> 7;
                random ^= random << 17;
                let mut key = CHECK_PERF_PREFIX.to_vec();
                key.extend_from_slice(&random.to_le_bytes());
                key.resize(key.len() + 248, 0);
                let revision = batch.next_revision();
                batch.put(revision, &key, value, 0, false).expect("put");
            }
            batch.commit().expect("commit");
        }
    }

    const CHECK_PERF_PREFIX: &[u8] = b"/etcdctl-check-perf/";
    const CHECK_PERF_KEYS: KeySpan<'static> =
        KeySpan { key: CHECK_PERF_PREFIX, range_end: b"/etcdctl-check-perf0" };

    /// The space a file takes on disk, as the member reports its database size.
    fn allocated(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).expect("metadata").blocks() * 512
    }

    /// `check perf`'s last request deletes every key it wrote, as one DeleteRange. Its
    /// tombstones copy every page of the versions tree. Here, deleting 24,576 keys from a
    /// 12.6 MB store adds 11.0 MB of tombstone rows; in one commit the file grew by 22.6 MB
    /// (the old pages were freed too late to take the copies), in durable steps by 12.6 MB.
    #[test]
    fn a_large_delete_range_grows_the_file_by_a_step_of_its_pages_not_by_all() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let store = MvccStore::open(&path).expect("open");
        let keys = 6 * DELETE_STEP_KEYS;
        put_check_perf_keys(&store, keys, 64, b"v");
        store.sync().expect("sync");
        let (file, in_use) = (allocated(&path), store.size_in_use().expect("in use"));

        let mut applying = store.applying(false).expect("applying");
        let revision = applying.batch().next_revision();
        assert_eq!(applying.delete_range(revision, CHECK_PERF_KEYS, false).expect("delete").len(), keys);
        applying.finish().expect("finish");
        store.sync().expect("sync");

        let grown = allocated(&path) - file;
        let rows = store.size_in_use().expect("in use") - in_use;
        eprintln!(
            "{keys} keys deleted: the file grew by {grown} bytes for {rows} bytes of new rows; the store held {in_use}"
        );
        assert!(grown < rows + in_use / 3, "the file grew by {grown} bytes for {rows} bytes of tombstones");
        assert_eq!(store.read().expect("read").revision().expect("revision"), revision);
        let live = everything(&store.read().expect("read"), revision);
        assert_eq!(live.count, 0, "every key deleted");
    }

    /// The steps of a large DeleteRange are committed, but readers and snapshots go by the
    /// store's revision, which moves with the last step: each sees every key or none.
    #[test]
    fn readers_and_snapshots_see_a_large_delete_range_whole_or_not_at_all() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = std::sync::Arc::new(MvccStore::open(&dir.path().join("db")).expect("open"));
        let keys = 4 * DELETE_STEP_KEYS;
        put_check_perf_keys(&store, keys, 64, b"v");
        let count = |view: &ReadView| {
            let spec =
                RangeRequestSpec { span: CHECK_PERF_KEYS, revision: 0, limit: 0, returned: Returned::Count };
            view.range(&spec).expect("range").count
        };
        let before = store.read().expect("read").hash_all().expect("hash");

        let deleting = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let reader = std::thread::spawn({
            let (store, deleting) = (store.clone(), deleting.clone());
            move || {
                let mut seen = Vec::new();
                while deleting.load(std::sync::atomic::Ordering::SeqCst) {
                    let view = store.read().expect("read");
                    seen.push((count(&view), view.hash_all().expect("hash")));
                }
                seen
            }
        });
        let mut applying = store.applying(false).expect("applying");
        let revision = applying.batch().next_revision();
        applying.delete_range(revision, CHECK_PERF_KEYS, false).expect("delete");
        applying.finish().expect("finish");
        deleting.store(false, std::sync::atomic::Ordering::SeqCst);
        let seen = reader.join().expect("reader");

        let after = store.read().expect("read").hash_all().expect("hash");
        assert!(seen.len() > 1, "the reader read while the delete was applied ({} reads)", seen.len());
        for (counted, hash) in seen {
            assert!(
                (counted, hash) == (keys as i64, before) || (counted, hash) == (0, after),
                "a reader saw {counted} of {keys} keys"
            );
        }
    }

    /// A snapshot is read by the store's revision: one without it, or with versions past it,
    /// is refused and the store keeps what it had.
    #[test]
    fn a_snapshot_without_the_stores_revision_or_with_versions_past_it_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = MvccStore::open(&dir.path().join("db")).expect("open");
        put(&store, "kept", "v");
        let before = store.read().expect("read").hash_all().expect("hash");
        let record = |out: &mut Vec<u8>, table: u8, key: &[u8], value: &[u8]| {
            write_record(out, table, key, value).expect("record");
        };
        let version = |revision: i64| {
            let mut key = b"k".to_vec();
            key.extend_from_slice(&revision.to_be_bytes());
            let kv = KeyValue {
                key: b"k".to_vec(),
                create_revision: revision,
                mod_revision: revision,
                version: 1,
                ..KeyValue::default()
            };
            (key, kv.encode_to_vec())
        };
        let (key, kv) = version(5);
        let mut without_revision = Vec::new();
        record(&mut without_revision, TABLE_HISTORY, &key, &kv);
        record(&mut without_revision, TABLE_META, META_COMPACT_REVISION.as_bytes(), &0i64.to_be_bytes());
        let mut past_revision = without_revision.clone();
        record(&mut past_revision, TABLE_META, META_REVISION.as_bytes(), &4i64.to_be_bytes());
        let mut whole = without_revision.clone();
        record(&mut whole, TABLE_META, META_REVISION.as_bytes(), &5i64.to_be_bytes());

        for (records, refusal) in [
            (without_revision, "no store revision"),
            (past_revision, "a version at 5, past the store's revision 4"),
        ] {
            let error = store.restore(&mut records.as_slice()).expect_err("refused");
            assert!(error.to_string().contains(refusal), "{error}");
            assert_eq!(
                store.read().expect("read").hash_all().expect("hash"),
                before,
                "the store kept what it had"
            );
        }
        store.restore(&mut whole.as_slice()).expect("a whole snapshot");
        assert_eq!(store.read().expect("read").revision().expect("revision"), 5);
    }
}
