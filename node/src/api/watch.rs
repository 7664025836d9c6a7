//! The etcd Watch service: each stream is served by one task on the member the client is
//! connected to, from that member's applied state, so watches outlive leader changes.
//!
//! A stream subscribes to the member's watch hub before it reads anything from the store
//! (see `kv::watch` for why that makes catch-up and live events join exactly). When the
//! stream falls behind the hub (a slow client) or a snapshot replaces the store, its
//! watchers re-read what they miss from history. Only this stream waits for a slow
//! client: the hub never blocks the state machine.
//!
//! `fragment` is accepted and ignored: responses are capped by size but never split a
//! revision, so a single revision larger than the cap goes in one response.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{broadcast, mpsc};
use tonic::{Request, Response, Status, Streaming};

use crate::kv::KvError;
use crate::kv::watch::{
    Cursor, Delivery, EventFilter, Notice, PreviousValueWatcher, Start, deliver_live, split_by_revision,
    start_at,
};
use crate::member::Node;
use crate::proto::etcdserverpb::watch_create_request::FilterType;
use crate::proto::etcdserverpb::watch_request::RequestUnion;
use crate::proto::etcdserverpb::watch_server::Watch;
use crate::proto::etcdserverpb::{WatchCreateRequest, WatchRequest, WatchResponse};
use crate::proto::mvccpb::Event;

/// Events per response stay well below the 1.5 MiB etcd's clients expect a message to fit.
const MAX_EVENT_BYTES: usize = 1 << 20;
/// Responses queued for one client; a client that reads slower than this waits alone.
const RESPONSE_QUEUE: usize = 16;
/// etcd's watch id for responses that concern every watcher of the stream.
const ALL_WATCHERS: i64 = -1;
/// Feed notices handled before a periodic progress notification.
const PROGRESS_DRAIN_LIMIT: usize = 1024;

pub struct WatchService {
    node: Arc<Node>,
    progress_interval: Duration,
}

impl WatchService {
    pub fn new(node: Arc<Node>, progress_interval: Duration) -> Self {
        Self { node, progress_interval }
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = ResponseStream;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let inbound = request.into_inner();
        let (responses, outbound) = mpsc::channel(RESPONSE_QUEUE);
        let session = Session {
            // Before any read of the store: see the module comment.
            feed: self.node.watch_hub.subscribe(),
            node: self.node.clone(),
            responses,
            watchers: BTreeMap::new(),
            next_auto_id: 0,
        };
        tokio::spawn(session.run(inbound, self.progress_interval));
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(outbound))))
    }
}

struct Watcher {
    filter: EventFilter,
    cursor: Cursor,
    progress_notify: bool,
    /// Held while a watcher that asked for `prev_kv` lives, so that batches carry them.
    _previous_values: Option<PreviousValueWatcher>,
}

/// Why a stream ends early.
enum Stop {
    /// The client went away; nothing more to do.
    Gone,
    Failed(Status),
}

impl From<KvError> for Stop {
    fn from(e: KvError) -> Self {
        Stop::Failed(e.into())
    }
}

type Flow = Result<(), Stop>;

/// The outcome of reading a watcher's missed events from the store.
struct CatchUp {
    /// The store revision the read saw.
    revision: i64,
    compact_revision: i64,
    start: Start,
    events: Vec<Event>,
}

struct Session {
    node: Arc<Node>,
    feed: broadcast::Receiver<Arc<Notice>>,
    responses: mpsc::Sender<Result<WatchResponse, Status>>,
    watchers: BTreeMap<i64, Watcher>,
    next_auto_id: i64,
}

impl Session {
    async fn run(mut self, mut inbound: Streaming<WatchRequest>, progress_interval: Duration) {
        let mut progress =
            tokio::time::interval_at(tokio::time::Instant::now() + progress_interval, progress_interval);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let outcome: Flow = async {
            loop {
                tokio::select! {
                    request = inbound.next() => match request {
                        Some(Ok(request)) => self.handle(request).await?,
                        // The client closed its side or the connection broke.
                        Some(Err(_)) | None => return Ok(()),
                    },
                    notice = self.feed.recv() => self.on_feed(notice).await?,
                    _ = progress.tick() => self.notify_progress().await?,
                    () = self.responses.closed() => return Ok(()),
                }
            }
        }
        .await;
        if let Err(Stop::Failed(status)) = outcome {
            tracing::warn!("watch stream failed: {status}");
            let _ = self.responses.send(Err(status)).await;
        }
    }

    async fn send(&self, response: WatchResponse) -> Flow {
        self.responses.send(Ok(response)).await.map_err(|_| Stop::Gone)
    }

    fn response(&self, revision: i64, watch_id: i64) -> WatchResponse {
        WatchResponse { header: Some(self.node.header(revision)), watch_id, ..WatchResponse::default() }
    }

    async fn handle(&mut self, request: WatchRequest) -> Flow {
        match request.request_union {
            Some(RequestUnion::CreateRequest(create)) => self.create(create).await,
            Some(RequestUnion::CancelRequest(cancel)) => {
                // As etcd, cancelling an unknown watcher gets no answer.
                if self.watchers.remove(&cancel.watch_id).is_some() {
                    let revision = self.node.store.read()?.revision()?;
                    let response =
                        WatchResponse { canceled: true, ..self.response(revision, cancel.watch_id) };
                    self.send(response).await?;
                }
                Ok(())
            }
            Some(RequestUnion::ProgressRequest(_)) => self.answer_progress_request().await,
            None => Ok(()),
        }
    }

    async fn create(&mut self, request: WatchCreateRequest) -> Flow {
        // etcd's normalisation: an empty key watches from the smallest key.
        let key = if request.key.is_empty() { vec![0] } else { request.key };
        let filter = EventFilter {
            no_put: request.filters.contains(&(FilterType::Noput as i32)),
            no_delete: request.filters.contains(&(FilterType::Nodelete as i32)),
            prev_kv: request.prev_kv,
            key,
            range_end: request.range_end,
        };
        let refused =
            if !filter.range_end.is_empty() && filter.range_end != [0] && filter.key >= filter.range_end {
                Some("mvcc: watcher range is empty")
            } else if request.watch_id != 0 && self.watchers.contains_key(&request.watch_id) {
                Some("mvcc: duplicate watch ID provided on the WatchStream")
            } else {
                None
            };
        if let Some(reason) = refused {
            let revision = self.node.store.read()?.revision()?;
            return self
                .send(WatchResponse {
                    created: true,
                    canceled: true,
                    cancel_reason: reason.to_owned(),
                    ..self.response(revision, ALL_WATCHERS)
                })
                .await;
        }
        let id = if request.watch_id != 0 {
            request.watch_id
        } else {
            while self.watchers.contains_key(&self.next_auto_id) {
                self.next_auto_id += 1;
            }
            self.next_auto_id += 1;
            self.next_auto_id - 1
        };
        // Before the catch-up: a batch written from now on carries previous values, and one
        // that does not is re-read from history (`deliver`).
        let previous_values = filter.prev_kv.then(|| self.node.watch_hub.watching_previous_values());
        let catch_up = self.read_history(filter.clone(), request.start_revision).await?;
        self.send(WatchResponse { created: true, ..self.response(catch_up.revision, id) }).await?;
        let watcher = Watcher {
            filter,
            cursor: Cursor { next: 0 },
            progress_notify: request.progress_notify,
            _previous_values: previous_values,
        };
        self.watchers.insert(id, watcher);
        self.finish_catch_up(id, catch_up).await
    }

    /// Reads from the store what a watcher starting at `start` (a requested start revision)
    /// has not seen, on a blocking thread: history scans may be long.
    async fn read_history(&self, filter: EventFilter, start: i64) -> Result<CatchUp, Stop> {
        let store = self.node.store.clone();
        tokio::task::spawn_blocking(move || -> Result<CatchUp, KvError> {
            let view = store.read()?;
            let revision = view.revision()?;
            let compact_revision = view.compact_revision()?;
            let start = start_at(start, revision, compact_revision);
            let events = match start {
                Start::From(from) => view
                    .history_events(filter.span(), from, revision)?
                    .iter()
                    .filter_map(|e| filter.select(e))
                    .collect(),
                Start::Compacted(_) => Vec::new(),
            };
            Ok(CatchUp { revision, compact_revision, start, events })
        })
        .await
        .map_err(|e| Stop::Failed(Status::internal(format!("etcdserver: {e}"))))?
        .map_err(Stop::from)
    }

    /// Sends a caught-up watcher its events and moves its cursor past the read, or cancels
    /// it when its history was compacted away.
    async fn finish_catch_up(&mut self, id: i64, catch_up: CatchUp) -> Flow {
        match catch_up.start {
            Start::Compacted(compact_revision) => {
                self.watchers.remove(&id);
                let response = WatchResponse {
                    canceled: true,
                    compact_revision,
                    cancel_reason: "mvcc: required revision has been compacted".to_owned(),
                    ..self.response(catch_up.revision, id)
                };
                self.send(response).await
            }
            Start::From(from) => {
                if let Some(watcher) = self.watchers.get_mut(&id) {
                    watcher.cursor = Cursor { next: from.max(watcher.cursor.next) };
                    watcher.cursor.caught_up(catch_up.revision);
                }
                tracing::trace!(id, compacted = catch_up.compact_revision, "watcher caught up");
                self.send_events(id, catch_up.revision, catch_up.events).await
            }
        }
    }

    /// Events for one watcher, in responses of bounded size; `revision` is the header's
    /// revision once all are sent (earlier responses carry their last event's revision).
    async fn send_events(&self, id: i64, revision: i64, events: Vec<Event>) -> Flow {
        let chunks = split_by_revision(events, MAX_EVENT_BYTES);
        let count = chunks.len();
        for (i, events) in chunks.into_iter().enumerate() {
            let header_revision = if i + 1 == count {
                revision
            } else {
                events.last().map_or(revision, crate::kv::watch::revision_of)
            };
            self.send(WatchResponse { events, ..self.response(header_revision, id) }).await?;
        }
        Ok(())
    }

    async fn on_feed(&mut self, notice: Result<Arc<Notice>, RecvError>) -> Flow {
        match notice {
            Ok(notice) => match notice.as_ref() {
                Notice::Committed { revision, events, previous_values } => {
                    self.deliver(*revision, events, *previous_values).await
                }
                Notice::Replaced => self.resynchronise().await,
            },
            Err(RecvError::Lagged(missed)) => {
                tracing::info!(missed, "a watch stream fell behind; re-reading from history");
                self.resynchronise().await
            }
            // The member is stopping.
            Err(RecvError::Closed) => Err(Stop::Failed(Status::unavailable("etcdserver: server stopped"))),
        }
    }

    async fn deliver(&mut self, revision: i64, events: &[Event], previous_values: bool) -> Flow {
        let mut outgoing = Vec::new();
        let mut rereads = Vec::new();
        for (id, watcher) in &mut self.watchers {
            match deliver_live(&mut watcher.cursor, &watcher.filter, revision, events, previous_values) {
                Delivery::Nothing => {}
                Delivery::Send(selected) => outgoing.push((*id, selected)),
                Delivery::Reread => rereads.push(*id),
            }
        }
        for (id, events) in outgoing {
            self.send_events(id, revision, events).await?;
        }
        for id in rereads {
            self.reread(id).await?;
        }
        Ok(())
    }

    /// Every watcher re-reads from its cursor on: the feed no longer holds everything after it.
    async fn resynchronise(&mut self) -> Flow {
        let ids: Vec<i64> = self.watchers.keys().copied().collect();
        for id in ids {
            self.reread(id).await?;
        }
        Ok(())
    }

    /// One watcher's events from its cursor on, read from history.
    async fn reread(&mut self, id: i64) -> Flow {
        let Some(watcher) = self.watchers.get(&id) else { return Ok(()) };
        let catch_up = self.read_history(watcher.filter.clone(), watcher.cursor.next).await?;
        self.finish_catch_up(id, catch_up).await
    }

    /// The revision up to which `watcher` has had every event, as a progress notification
    /// tells it (never past the store: a watcher may wait for a future revision).
    fn progress_revision(watcher: &Watcher, current: i64) -> i64 {
        watcher.cursor.delivered().min(current)
    }

    /// etcd answers a progress request with one response for the whole stream (watch id
    /// -1), at a revision every watcher has had all events up to. The feed is followed up
    /// to the store's revision at the request first, so the answer is no older than it.
    async fn answer_progress_request(&mut self) -> Flow {
        let current = self.node.store.read()?.revision()?;
        loop {
            let behind = self.watchers.values().any(|w| Self::progress_revision(w, current) < current);
            if !behind {
                break;
            }
            let notice = self.feed.recv().await;
            self.on_feed(notice).await?;
        }
        let revision =
            self.watchers.values().map(|w| Self::progress_revision(w, current)).min().unwrap_or(current);
        self.send(self.response(revision, ALL_WATCHERS)).await
    }

    /// The periodic notification of watchers that asked for it, after what the feed holds.
    async fn notify_progress(&mut self) -> Flow {
        if !self.watchers.values().any(|w| w.progress_notify) {
            return Ok(());
        }
        // Bounded: under a steady stream of writes the feed is never empty.
        for _ in 0..PROGRESS_DRAIN_LIMIT {
            match self.feed.try_recv() {
                Ok(notice) => self.on_feed(Ok(notice)).await?,
                Err(TryRecvError::Lagged(missed)) => self.on_feed(Err(RecvError::Lagged(missed))).await?,
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
        let current = self.node.store.read()?.revision()?;
        let due: Vec<(i64, i64)> = self
            .watchers
            .iter()
            .filter(|(_, w)| w.progress_notify)
            .map(|(id, w)| (*id, Self::progress_revision(w, current)))
            .collect();
        for (id, revision) in due {
            self.send(self.response(revision, id)).await?;
        }
        Ok(())
    }
}
