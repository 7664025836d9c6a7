//! `/metrics`, `/healthz` and `/readyz` for Prometheus and the kubelet.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::metrics::Metrics;

/// A watch that fails this long without a break is down, not blinking: the controller it
/// feeds acts on an ever older picture, and a restart (new connections, a new token) is
/// the one thing left to try. Long enough that an API server upgrade passes without one.
pub const WATCH_DOWN_AFTER: Duration = Duration::from_secs(300);
/// A watch retries at most 30 s after a failure (kube's default backoff) and a retry that
/// fails again says so, so errors further apart than this had a working watch between them.
const WATCH_RETRY_GAP: Duration = Duration::from_secs(90);

/// What a watch stream just did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchOutcome {
    /// An object or a re-list step arrived.
    Delivered,
    /// A (re-)list completed: the cache holds every object.
    Synced,
    Failed,
}

#[derive(Debug, Default)]
struct WatchState {
    synced: bool,
    /// The first and the latest error of the current run of failures, if it is failing.
    failing: Option<(Instant, Instant)>,
}

/// What the endpoints report.
pub struct Health {
    pub metrics: Arc<Metrics>,
    /// This replica holds the lease and reconciles.
    pub leading: AtomicBool,
    /// The controller's watch streams by kind, while this replica reconciles.
    watches: Mutex<BTreeMap<&'static str, WatchState>>,
}

impl Health {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics, leading: AtomicBool::new(false), watches: Mutex::default() }
    }

    pub fn watch(&self, name: &'static str, outcome: WatchOutcome, at: Instant) {
        let mut watches = self.watches.lock().unwrap_or_else(PoisonError::into_inner);
        let state = watches.entry(name).or_default();
        match outcome {
            WatchOutcome::Delivered => state.failing = None,
            WatchOutcome::Synced => *state = WatchState { synced: true, failing: None },
            WatchOutcome::Failed => {
                state.failing = match state.failing {
                    Some((since, last)) if at.duration_since(last) < WATCH_RETRY_GAP => Some((since, at)),
                    _ => Some((at, at)),
                }
            }
        }
    }

    /// Why this replica is not alive, if it is not: a watch that has been failing without
    /// a break for `WATCH_DOWN_AFTER` (a standby runs none).
    fn dead(&self, now: Instant) -> Option<String> {
        let watches = self.watches.lock().unwrap_or_else(PoisonError::into_inner);
        watches.iter().find_map(|(name, state)| {
            let (since, last) = state.failing?;
            let still_failing = now.duration_since(last) < WATCH_RETRY_GAP;
            let down_for = now.duration_since(since);
            (still_failing && down_for >= WATCH_DOWN_AFTER)
                .then(|| format!("the {name} watch has failed for {} s", down_for.as_secs()))
        })
    }

    /// Why this replica is not ready, if it is not: it leads, but not every watch has
    /// listed its objects yet, so it reconciles from a partial picture. A standby is
    /// ready: it must count as available, or a rolling update of the operator (maxSurge 0)
    /// would wait on it for ever.
    fn unready(&self) -> Option<String> {
        if !self.leading.load(Ordering::Relaxed) {
            return None;
        }
        let watches = self.watches.lock().unwrap_or_else(PoisonError::into_inner);
        let pending: Vec<&str> = watches.iter().filter(|(_, s)| !s.synced).map(|(name, _)| *name).collect();
        match (watches.is_empty(), pending.is_empty()) {
            (true, _) => Some("leading, the watches not started yet".to_owned()),
            (false, true) => None,
            (false, false) => Some(format!("leading, still listing {}", pending.join(", "))),
        }
    }
}

pub fn answer(health: &Health, path: &str, now: Instant) -> Response<Full<Bytes>> {
    let leading = health.leading.load(Ordering::Relaxed);
    let role = if leading { "leading" } else { "standby" };
    let probe = |problem: Option<String>| match problem {
        Some(problem) => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("{problem}\n")),
        None => (StatusCode::OK, "text/plain", format!("ok: {role}\n")),
    };
    let (status, content_type, body) = match path {
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            health.metrics.render(),
        ),
        "/healthz" => probe(health.dead(now)),
        "/readyz" => probe(health.unready()),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = http::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(http::header::CONTENT_TYPE, value);
    }
    response
}

pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    stop: impl Future<Output = ()>,
) -> std::io::Result<()> {
    tokio::pin!(stop);
    loop {
        let (stream, _) = tokio::select! {
            () = &mut stop => return Ok(()),
            accepted = listener.accept() => accepted?,
        };
        let health = health.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let response = answer(&health, request.uri().path(), Instant::now());
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(health: &Health, path: &str, now: Instant) -> StatusCode {
        answer(health, path, now).status()
    }

    #[test]
    fn a_standby_is_alive_and_ready_and_metrics_are_exposed() {
        let health = Health::new(Metrics::shared());
        let now = Instant::now();
        assert_eq!(status(&health, "/healthz", now), StatusCode::OK);
        assert_eq!(status(&health, "/readyz", now), StatusCode::OK);
        assert_eq!(status(&health, "/metrics", now), StatusCode::OK);
        assert_eq!(status(&health, "/nope", now), StatusCode::NOT_FOUND);
    }

    #[test]
    fn a_leader_is_ready_once_every_watch_has_listed() {
        let health = Health::new(Metrics::shared());
        health.leading.store(true, Ordering::Relaxed);
        let now = Instant::now();
        assert_eq!(status(&health, "/readyz", now), StatusCode::SERVICE_UNAVAILABLE);
        health.watch("ConsensusCluster", WatchOutcome::Synced, now);
        health.watch("StatefulSet", WatchOutcome::Delivered, now);
        assert_eq!(status(&health, "/readyz", now), StatusCode::SERVICE_UNAVAILABLE);
        health.watch("StatefulSet", WatchOutcome::Synced, now);
        assert_eq!(status(&health, "/readyz", now), StatusCode::OK);
        assert_eq!(status(&health, "/healthz", now), StatusCode::OK);
    }

    #[test]
    fn a_watch_failing_without_a_break_makes_the_replica_dead_and_a_recovered_one_does_not() {
        let health = Health::new(Metrics::shared());
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        health.watch("StatefulSet", WatchOutcome::Synced, start);
        // Retried every 30 s, failing each time: down after WATCH_DOWN_AFTER.
        for seconds in (0..=WATCH_DOWN_AFTER.as_secs()).step_by(30) {
            health.watch("StatefulSet", WatchOutcome::Failed, at(seconds));
        }
        assert_eq!(status(&health, "/healthz", at(WATCH_DOWN_AFTER.as_secs() - 60)), StatusCode::OK);
        assert_eq!(
            status(&health, "/healthz", at(WATCH_DOWN_AFTER.as_secs())),
            StatusCode::SERVICE_UNAVAILABLE
        );
        // No error for longer than a retry takes: the watch works again, quiet as it is.
        assert_eq!(status(&health, "/healthz", at(WATCH_DOWN_AFTER.as_secs() + 100)), StatusCode::OK);

        // Errors with working spells between them are not one outage.
        let blinking = Health::new(Metrics::shared());
        for seconds in (0..=2 * WATCH_DOWN_AFTER.as_secs()).step_by(100) {
            blinking.watch("Service", WatchOutcome::Failed, at(seconds));
        }
        assert_eq!(status(&blinking, "/healthz", at(2 * WATCH_DOWN_AFTER.as_secs())), StatusCode::OK);

        // An object arriving ends the outage at once.
        health.watch("StatefulSet", WatchOutcome::Delivered, at(WATCH_DOWN_AFTER.as_secs() + 1));
        assert_eq!(status(&health, "/healthz", at(WATCH_DOWN_AFTER.as_secs() + 2)), StatusCode::OK);
    }
}
