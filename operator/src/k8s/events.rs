//! Events (events.k8s.io/v1) about a ConsensusCluster, folded into a series only when they
//! say the same thing again.
//!
//! kube's `Recorder` folds by reason, action and objects but not by note, so a second
//! "VotersChanged" (3 -> 5, then 5 -> 3) became "x2" of the first note, and `kubectl
//! describe` told a scale-down as the scale-up before it. Here the note is part of the key:
//! a repeat of the same failure is counted, a different change is a new Event.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as KubeEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Reporter};
use kube::{Api, Client};
use tokio::sync::Mutex;

/// A series older than this starts over as a new Event (kube's Recorder uses the same).
const SERIES_TTL: Duration = Duration::from_secs(6 * 60);

pub struct Events {
    client: Client,
    reporter: Reporter,
    series: Mutex<HashMap<Key, Series>>,
}

/// Everything an Event says: two publishes with the same key are the same news.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    warning: bool,
    reason: String,
    action: String,
    note: Option<String>,
    regarding: Reference,
    related: Option<Reference>,
}

/// The identity of an object, without its resourceVersion (which moves with every status
/// write and says nothing about which object an Event is about).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Reference {
    kind: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    uid: Option<String>,
}

impl From<&ObjectReference> for Reference {
    fn from(r: &ObjectReference) -> Self {
        Self {
            kind: r.kind.clone(),
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            uid: r.uid.clone(),
        }
    }
}

struct Series {
    event_name: String,
    count: i32,
    last: Instant,
}

impl Events {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self { client, reporter, series: Mutex::default() }
    }

    /// Creates the Event, or counts it again if the same was published within the TTL.
    pub async fn publish(&self, event: &Event, regarding: &ObjectReference) -> Result<(), kube::Error> {
        let namespace = regarding.namespace.clone().unwrap_or_else(|| "default".to_owned());
        let api = Api::<KubeEvent>::namespaced(self.client.clone(), &namespace);
        let key = Key {
            warning: event.type_ == EventType::Warning,
            reason: event.reason.clone(),
            action: event.action.clone(),
            note: event.note.clone(),
            regarding: regarding.into(),
            related: event.secondary.as_ref().map(Reference::from),
        };
        // Held across the request, so that two publishes of the same news cannot both create.
        let mut series = self.series.lock().await;
        series.retain(|_, s| s.last.elapsed() < SERIES_TTL);
        let now = MicroTime(Timestamp::now());
        if let Some(seen) = series.get_mut(&key) {
            let count = seen.count + 1;
            let patch = serde_json::json!({
                "series": EventSeries { count, last_observed_time: now },
            });
            api.patch(&seen.event_name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
            seen.count = count;
            seen.last = Instant::now();
            return Ok(());
        }
        let created =
            api.create(&PostParams::default(), &self.new_event(event, regarding, &namespace, now)).await?;
        let event_name = created.metadata.name.unwrap_or_default();
        series.insert(key, Series { event_name, count: 1, last: Instant::now() });
        Ok(())
    }

    fn new_event(
        &self,
        event: &Event,
        regarding: &ObjectReference,
        namespace: &str,
        now: MicroTime,
    ) -> KubeEvent {
        let object = regarding.name.as_deref().unwrap_or("object");
        KubeEvent {
            metadata: ObjectMeta {
                // As kubectl and client-go name them: the object, and a unique suffix.
                name: Some(format!("{object}.{:x}", now.0.as_nanosecond())),
                namespace: Some(namespace.to_owned()),
                ..ObjectMeta::default()
            },
            action: Some(event.action.clone()),
            reason: Some(event.reason.clone()),
            note: event.note.clone(),
            type_: Some(if event.type_ == EventType::Warning { "Warning" } else { "Normal" }.to_owned()),
            event_time: Some(now),
            regarding: Some(regarding.clone()),
            related: event.secondary.clone(),
            reporting_controller: Some(self.reporter.controller.clone()),
            reporting_instance: Some(
                self.reporter.instance.clone().unwrap_or_else(|| self.reporter.controller.clone()),
            ),
            ..KubeEvent::default()
        }
    }
}
