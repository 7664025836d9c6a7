//! `/metrics`, `/healthz` and `/readyz` for Prometheus and the kubelet.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::metrics::Metrics;

/// What the endpoints report.
pub struct Health {
    pub metrics: Arc<Metrics>,
    /// This replica holds the lease and reconciles.
    pub leading: AtomicBool,
}

pub fn answer(health: &Health, path: &str) -> Response<Full<Bytes>> {
    let leading = health.leading.load(Ordering::Relaxed);
    let (status, content_type, body) = match path {
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            health.metrics.render(),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        // A standby is ready too: it must count as available, or a rolling update of the
        // operator (maxSurge 0) would wait on it forever.
        "/readyz" => {
            (StatusCode::OK, "text/plain", if leading { "ok: leading\n" } else { "ok: standby\n" }.to_owned())
        }
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
                let response = answer(&health, request.uri().path());
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

    #[test]
    fn probes_answer_and_metrics_are_exposed() {
        let health = Health { metrics: Metrics::shared(), leading: AtomicBool::new(false) };
        assert_eq!(answer(&health, "/healthz").status(), StatusCode::OK);
        assert_eq!(answer(&health, "/readyz").status(), StatusCode::OK);
        assert_eq!(answer(&health, "/metrics").status(), StatusCode::OK);
        assert_eq!(answer(&health, "/nope").status(), StatusCode::NOT_FOUND);
    }
}
