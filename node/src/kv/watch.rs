//! What watchers need from the store: each committed batch's events fanned out in-process
//! (the hub), the events of a range of revisions read back from history (catch-up), and the
//! rules that join the two without gaps or duplicates.
//!
//! A watcher follows a cursor, the next revision it has not been sent. The API layer
//! subscribes to the hub before it opens the read view a catch-up reads from: every batch
//! committed after that view is then in the subscription, every batch before it is in the
//! view, and the cursor drops what both hold.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::broadcast;

use super::store::{KeySpan, KvError, ReadView};
use crate::proto::mvccpb::event::EventType;
use crate::proto::mvccpb::{Event, KeyValue};

/// Batches kept for subscribers that are behind. tokio keeps a value until it is
/// overwritten, so this bounds the memory of committed events held for watchers; a
/// subscriber that falls further behind re-reads from history instead.
const HUB_CAPACITY: usize = 256;

/// What the state machine tells watchers.
#[derive(Debug)]
pub enum Notice {
    /// The events of one commit, by revision and then key; `revision` is the store's
    /// revision after it. Unless `previous_values`, an event's `prev_kv` may lack its value:
    /// the batch was written while no watcher asked for `prev_kv`.
    Committed { revision: i64, events: Vec<Event>, previous_values: bool },
    /// A snapshot replaced the store: what a watcher has seen may not follow from the
    /// notices before this one, so it re-reads from the store.
    Replaced,
}

/// In-process fan-out of committed events, from the state machine to the watch streams.
#[derive(Clone)]
pub struct WatchHub {
    sender: broadcast::Sender<Arc<Notice>>,
    /// Live watchers that asked for `prev_kv`, on every stream of this member.
    previous_value_watchers: Arc<AtomicUsize>,
}

/// Held by a watcher that asked for `prev_kv` for as long as it lives: while any is held,
/// batches read the values their writes replace.
pub struct PreviousValueWatcher(Arc<AtomicUsize>);

impl Drop for PreviousValueWatcher {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Default for WatchHub {
    fn default() -> Self {
        Self::new()
    }
}

impl WatchHub {
    pub fn new() -> Self {
        Self { sender: broadcast::channel(HUB_CAPACITY).0, previous_value_watchers: Arc::default() }
    }

    /// Whether a batch written now must carry the values its writes replace.
    pub fn wants_previous_values(&self) -> bool {
        self.previous_value_watchers.load(Ordering::SeqCst) > 0
    }

    /// Registers a watcher that asks for `prev_kv`, until the returned guard is dropped.
    pub fn watching_previous_values(&self) -> PreviousValueWatcher {
        self.previous_value_watchers.fetch_add(1, Ordering::SeqCst);
        PreviousValueWatcher(self.previous_value_watchers.clone())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Notice>> {
        self.sender.subscribe()
    }

    /// Publishes a committed batch's events (from `WriteBatch::commit`), in revision order
    /// and by key within a revision: history keeps no order inside a revision, and a watcher
    /// that replays history must see the same order as one that saw the events live.
    /// `previous_values` says whether the batch read the values its writes replaced
    /// (`WriteBatch::set_previous_values`).
    pub fn committed(&self, mut events: Vec<Event>, previous_values: bool) {
        // Without subscribers nothing would read the batch; skip building it.
        if events.is_empty() || self.sender.receiver_count() == 0 {
            return;
        }
        fn key(e: &Event) -> &[u8] {
            e.kv.as_ref().map_or(&[], |kv| kv.key.as_slice())
        }
        events.sort_by(|a, b| revision_of(a).cmp(&revision_of(b)).then_with(|| key(a).cmp(key(b))));
        let revision = events.iter().map(revision_of).max().unwrap_or(0);
        // An error only means every subscriber left meanwhile.
        let _ = self.sender.send(Arc::new(Notice::Committed { revision, events, previous_values }));
    }

    pub fn replaced(&self) {
        let _ = self.sender.send(Arc::new(Notice::Replaced));
    }
}

/// The revision an event happened at (a tombstone carries the deletion's revision).
pub fn revision_of(event: &Event) -> i64 {
    event.kv.as_ref().map_or(0, |kv| kv.mod_revision)
}

/// Where a new or resynchronising watcher starts: the next revision to send it, or the
/// compaction revision when the history it asks for is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    From(i64),
    Compacted(i64),
}

/// `requested` 0 or less means from the next revision on, as etcd treats 0. A revision
/// below the compaction revision is refused as etcd refuses it (`minRev < compactRev`).
pub fn start_at(requested: i64, current: i64, compacted: i64) -> Start {
    if requested <= 0 {
        Start::From(current + 1)
    } else if requested < compacted {
        Start::Compacted(compacted)
    } else {
        Start::From(requested)
    }
}

/// The events of the rows of one key's history, from `rows` in (key, revision) order, that
/// fall in `from..=to`, each with the key's state before it (none after a deletion).
pub fn events_from_history(rows: impl IntoIterator<Item = KeyValue>, from: i64, to: i64) -> Vec<Event> {
    let mut events = Vec::new();
    let mut previous: Option<KeyValue> = None;
    for kv in rows {
        let same_key = previous.as_ref().is_some_and(|p| p.key == kv.key);
        let revision = kv.mod_revision;
        if (from..=to).contains(&revision) {
            let prev_kv = previous.as_ref().filter(|p| same_key && p.version > 0).cloned();
            let kind = if kv.version > 0 { EventType::Put } else { EventType::Delete };
            events.push(Event { r#type: kind.into(), kv: Some(kv.clone()), prev_kv });
        }
        previous = Some(kv);
    }
    // Stable: a revision's events stay in key order, the order a range delete makes them.
    events.sort_by_key(revision_of);
    events
}

/// Splits events into responses of at most `max_bytes` of events each, never splitting a
/// revision (etcd's clients expect a revision's events together); a revision larger than
/// `max_bytes` goes alone.
pub fn split_by_revision(events: Vec<Event>, max_bytes: usize) -> Vec<Vec<Event>> {
    use prost::Message;
    let mut chunks: Vec<Vec<Event>> = Vec::new();
    let mut current: Vec<Event> = Vec::new();
    let mut current_bytes = 0;
    let mut iter = events.into_iter().peekable();
    while let Some(first) = iter.next() {
        let revision = revision_of(&first);
        let mut group = vec![first];
        while let Some(next) = iter.next_if(|e| revision_of(e) == revision) {
            group.push(next);
        }
        let bytes: usize = group.iter().map(|e| e.encoded_len() + 4).sum();
        if !current.is_empty() && current_bytes + bytes > max_bytes {
            chunks.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current.extend(group);
        current_bytes += bytes;
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

/// Which events one watcher wants and in what form.
#[derive(Debug, Clone)]
pub struct EventFilter {
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
    pub no_put: bool,
    pub no_delete: bool,
    pub prev_kv: bool,
}

impl EventFilter {
    pub fn span(&self) -> KeySpan<'_> {
        KeySpan { key: &self.key, range_end: &self.range_end }
    }

    /// The event as this watcher gets it, if it gets it.
    pub fn select(&self, event: &Event) -> Option<Event> {
        let kv = event.kv.as_ref()?;
        if !self.span().contains(&kv.key) {
            return None;
        }
        let is_put = event.r#type == EventType::Put as i32;
        if (is_put && self.no_put) || (!is_put && self.no_delete) {
            return None;
        }
        Some(Event {
            r#type: event.r#type,
            kv: event.kv.clone(),
            prev_kv: if self.prev_kv { event.prev_kv.clone() } else { None },
        })
    }
}

/// What one watcher does with a committed batch.
#[derive(Debug, PartialEq)]
pub enum Delivery {
    /// Nothing in it for this watcher (its cursor moved past it).
    Nothing,
    Send(Vec<Event>),
    /// It has events for a watcher that wants previous values, but was written without them:
    /// the watcher re-reads from its cursor, which stays put, from history.
    Reread,
}

/// The part of a committed batch (`Notice::Committed`) that a watcher gets.
pub fn deliver_live(
    cursor: &mut Cursor,
    filter: &EventFilter,
    revision: i64,
    events: &[Event],
    previous_values: bool,
) -> Delivery {
    let before = *cursor;
    let selected: Vec<Event> = cursor.take_live(revision, events).filter_map(|e| filter.select(e)).collect();
    if selected.is_empty() {
        Delivery::Nothing
    } else if filter.prev_kv && !previous_values {
        *cursor = before;
        Delivery::Reread
    } else {
        Delivery::Send(selected)
    }
}

/// The next revision a watcher has not been sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub next: i64,
}

impl Cursor {
    /// The events of a committed batch this watcher has not had yet; the cursor moves past
    /// the batch whether or not any event is for this watcher.
    pub fn take_live<'a>(&mut self, revision: i64, events: &'a [Event]) -> impl Iterator<Item = &'a Event> {
        let from = self.next;
        self.next = self.next.max(revision + 1);
        events.iter().filter(move |e| revision_of(e) >= from)
    }

    /// After a catch-up that sent everything up to `revision`.
    pub fn caught_up(&mut self, revision: i64) {
        self.next = self.next.max(revision + 1);
    }

    /// Everything at or below this revision has been sent.
    pub fn delivered(&self) -> i64 {
        self.next - 1
    }
}

impl ReadView {
    /// Every change to keys in `span` at revisions `from..=to`, in revision order, each
    /// with the key's state before it.
    pub fn history_events(&self, span: KeySpan<'_>, from: i64, to: i64) -> Result<Vec<Event>, KvError> {
        if from > to {
            return Ok(Vec::new());
        }
        // The versions before `from` are read too: each key's previous state comes from them.
        let rows = self.versions(span, to)?;
        Ok(events_from_history(rows, from, to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::MvccStore;

    fn kv(key: &str, revision: i64, version: i64, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            create_revision: if version > 0 { revision - version + 1 } else { 0 },
            mod_revision: revision,
            version,
            value: value.into(),
            lease: 0,
        }
    }

    fn summary(events: &[Event]) -> Vec<(i64, String, bool, Option<String>)> {
        events
            .iter()
            .map(|e| {
                let kv = e.kv.as_ref().expect("kv");
                (
                    kv.mod_revision,
                    String::from_utf8_lossy(&kv.key).into_owned(),
                    e.r#type == EventType::Put as i32,
                    e.prev_kv.as_ref().map(|p| String::from_utf8_lossy(&p.value).into_owned()),
                )
            })
            .collect()
    }

    #[test]
    fn live_events_come_in_the_order_history_replays_them() {
        let hub = WatchHub::new();
        let mut feed = hub.subscribe();
        // A Txn wrote b before a, at one revision.
        let put = |key: &str, revision| Event {
            r#type: EventType::Put.into(),
            kv: Some(kv(key, revision, 1, "v")),
            prev_kv: None,
        };
        let written = vec![put("z", 4), put("b", 5), put("a", 5)];
        hub.committed(written.clone(), true);
        let Ok(notice) = feed.try_recv() else { panic!("a notice") };
        let Notice::Committed { revision, events, .. } = notice.as_ref() else { panic!("committed") };
        assert_eq!(*revision, 5);
        let replayed =
            events_from_history([kv("a", 5, 1, "v"), kv("b", 5, 1, "v"), kv("z", 4, 1, "v")], 0, 5);
        assert_eq!(summary(events), summary(&replayed));
    }

    #[test]
    fn start_follows_etcd() {
        assert_eq!(start_at(0, 7, 0), Start::From(8));
        assert_eq!(start_at(-3, 7, 0), Start::From(8));
        assert_eq!(start_at(3, 7, 0), Start::From(3));
        assert_eq!(start_at(20, 7, 0), Start::From(20), "a future revision waits");
        assert_eq!(start_at(4, 7, 5), Start::Compacted(5));
        assert_eq!(start_at(5, 7, 5), Start::From(5), "the compaction revision itself is kept");
    }

    #[test]
    fn history_rows_become_events_in_revision_order_with_previous_states() {
        // Rows in (key, revision) order, as the history table holds them.
        let rows = vec![
            kv("a", 2, 1, "a1"),
            kv("a", 5, 2, "a2"),
            kv("a", 6, 0, ""),
            kv("a", 8, 1, "a3"),
            kv("b", 3, 1, "b1"),
            kv("b", 6, 0, ""),
        ];
        let events = events_from_history(rows, 3, 8);
        assert_eq!(
            summary(&events),
            vec![
                (3, "b".into(), true, None),
                (5, "a".into(), true, Some("a1".into())),
                (6, "a".into(), false, Some("a2".into())),
                (6, "b".into(), false, Some("b1".into())),
                (8, "a".into(), true, None),
            ]
        );
    }

    #[test]
    fn cursor_joins_catch_up_and_live_feed_without_gaps_or_duplicates() {
        let put = |key: &str, revision| Event {
            r#type: EventType::Put.into(),
            kv: Some(kv(key, revision, 1, "v")),
            prev_kv: None,
        };
        // Subscribed, then caught up to revision 5 from a view: the feed still holds the
        // batches of revisions 4..=5 (already sent) and then 6..=7.
        let mut cursor = Cursor { next: 2 };
        cursor.caught_up(5);
        let queued = [(4, vec![put("a", 4)]), (5, vec![put("b", 5)]), (7, vec![put("c", 6), put("d", 7)])];
        let mut sent = Vec::new();
        for (revision, events) in &queued {
            sent.extend(cursor.take_live(*revision, events).map(revision_of));
        }
        assert_eq!(sent, [6, 7]);
        assert_eq!(cursor.delivered(), 7);
        // A batch overlapping the cursor: only the part after it.
        let mut cursor = Cursor { next: 6 };
        let events = [put("x", 5), put("y", 6)];
        assert_eq!(cursor.take_live(6, &events).map(revision_of).collect::<Vec<_>>(), [6]);
        // A watcher waiting for a future revision skips earlier batches.
        let mut cursor = Cursor { next: 10 };
        assert_eq!(cursor.take_live(7, &events).count(), 0);
        assert_eq!(cursor.next, 10);
    }

    #[test]
    fn a_watcher_wanting_previous_values_rereads_a_batch_written_without_them() {
        let filter = |prev_kv| EventFilter {
            key: b"k".to_vec(),
            range_end: b"l".to_vec(),
            no_put: false,
            no_delete: false,
            prev_kv,
        };
        // A put that replaced a version, from a batch that did not read its value.
        let events = [Event {
            r#type: EventType::Put.into(),
            kv: Some(kv("k1", 6, 2, "new")),
            prev_kv: Some(kv("k1", 5, 1, "")),
        }];
        let mut cursor = Cursor { next: 6 };
        assert_eq!(deliver_live(&mut cursor, &filter(true), 6, &events, false), Delivery::Reread);
        assert_eq!(cursor.next, 6, "the cursor stays for the re-read");
        // With the values read, or for a watcher without prev_kv, the batch goes out as is.
        let Delivery::Send(sent) = deliver_live(&mut cursor, &filter(true), 6, &events, true) else {
            panic!("sent")
        };
        assert!(sent[0].prev_kv.is_some());
        assert_eq!(cursor.next, 7);
        let mut cursor = Cursor { next: 6 };
        let Delivery::Send(sent) = deliver_live(&mut cursor, &filter(false), 6, &events, false) else {
            panic!("sent")
        };
        assert_eq!(sent[0].prev_kv, None);
        // Nothing in the batch for the watcher: no re-read, and the cursor moves on.
        let mut cursor = Cursor { next: 6 };
        let elsewhere = EventFilter { key: b"x".to_vec(), range_end: Vec::new(), ..filter(true) };
        assert_eq!(deliver_live(&mut cursor, &elsewhere, 6, &events, false), Delivery::Nothing);
        assert_eq!(cursor.next, 7);
    }

    #[test]
    fn responses_never_split_a_revision() {
        let event = |key: &str, revision| Event {
            r#type: EventType::Put.into(),
            kv: Some(kv(key, revision, 1, &"x".repeat(100))),
            prev_kv: None,
        };
        let events = vec![event("a", 2), event("b", 2), event("c", 2), event("d", 3), event("e", 4)];
        let one = prost::Message::encoded_len(&events[0]) + 4;
        let chunks = split_by_revision(events, one * 2);
        let revisions: Vec<Vec<i64>> = chunks.iter().map(|c| c.iter().map(revision_of).collect()).collect();
        assert_eq!(revisions, vec![vec![2, 2, 2], vec![3, 4]]);
        assert!(split_by_revision(Vec::new(), 10).is_empty());
    }

    #[test]
    fn filter_selects_span_kinds_and_prev_kv() {
        let put = Event {
            r#type: EventType::Put.into(),
            kv: Some(kv("/app/a", 3, 2, "new")),
            prev_kv: Some(kv("/app/a", 2, 1, "old")),
        };
        let delete =
            Event { r#type: EventType::Delete.into(), kv: Some(kv("/app/b", 4, 0, "")), prev_kv: None };
        let prefix = EventFilter {
            key: b"/app/".to_vec(),
            range_end: b"/app0".to_vec(),
            no_put: false,
            no_delete: false,
            prev_kv: false,
        };
        assert_eq!(prefix.select(&put).and_then(|e| e.prev_kv), None);
        assert!(
            EventFilter { prev_kv: true, ..prefix.clone() }.select(&put).and_then(|e| e.prev_kv).is_some()
        );
        assert!(EventFilter { no_put: true, ..prefix.clone() }.select(&put).is_none());
        assert!(EventFilter { no_delete: true, ..prefix.clone() }.select(&delete).is_none());
        assert!(prefix.select(&delete).is_some());
        let single = EventFilter { key: b"/app/b".to_vec(), range_end: Vec::new(), ..prefix.clone() };
        assert!(single.select(&put).is_none());
        let from_key = EventFilter { key: b"/app/b".to_vec(), range_end: vec![0], ..prefix };
        assert!(from_key.select(&put).is_none() && from_key.select(&delete).is_some());
    }

    #[test]
    fn store_batches_hand_back_events_and_history_replays_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = MvccStore::open(&dir.path().join("kv.redb")).expect("open");
        let mut batch = store.write(false).expect("batch");
        let r2 = batch.next_revision();
        batch.put(r2, b"k1", b"a", 0, false).expect("put");
        let r3 = batch.next_revision();
        batch.put(r3, b"k1", b"b", 0, false).expect("put");
        let r4 = batch.next_revision();
        batch.put(r4, b"k2", b"c", 0, false).expect("put");
        let live = batch.commit().expect("commit");
        let mut batch = store.write(false).expect("batch");
        let r5 = batch.next_revision();
        batch.delete_range(r5, KeySpan { key: b"k", range_end: b"l" }, false).expect("delete");
        let mut deleted = batch.commit().expect("commit");
        let mut all = live;
        all.append(&mut deleted);
        assert_eq!(
            summary(&all),
            vec![
                (2, "k1".into(), true, None),
                (3, "k1".into(), true, Some("a".into())),
                (4, "k2".into(), true, None),
                (5, "k1".into(), false, Some("b".into())),
                (5, "k2".into(), false, Some("c".into())),
            ]
        );
        let view = store.read().expect("view");
        let span = KeySpan { key: b"k", range_end: b"l" };
        // History gives back exactly what the live feed carried.
        assert_eq!(view.history_events(span, 2, 5).expect("history"), all);
        assert_eq!(
            summary(&view.history_events(span, 4, 4).expect("history")),
            vec![(4, "k2".into(), true, None)]
        );
        let single = KeySpan { key: b"k1", range_end: b"" };
        assert_eq!(view.history_events(single, 3, 5).expect("history").len(), 2);
    }

    #[test]
    fn a_start_below_the_compaction_revision_is_refused() {
        // Compact is not served yet; the compaction revision is set as the store keeps it.
        let dir = tempfile::tempdir().expect("tempdir");
        let store = MvccStore::open(&dir.path().join("kv.redb")).expect("open");
        let mut batch = store.write(false).expect("batch");
        for i in 0..5 {
            let revision = batch.next_revision();
            batch.put(revision, b"k", format!("{i}").as_bytes(), 0, false).expect("put");
        }
        batch.set_meta("compact_revision", &4i64.to_be_bytes()).expect("meta");
        batch.commit().expect("commit");
        let view = store.read().expect("view");
        let (current, compacted) = (view.revision().expect("rev"), view.compact_revision().expect("compact"));
        assert_eq!((current, compacted), (6, 4));
        assert_eq!(start_at(3, current, compacted), Start::Compacted(4));
        assert_eq!(start_at(4, current, compacted), Start::From(4));
        assert_eq!(start_at(0, current, compacted), Start::From(7));
    }
}
