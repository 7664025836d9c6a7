//! The metrics port (2381): `/metrics`, and health answers like etcd's for load balancers
//! and Kubernetes probes.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::member::Node;

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// The answer for `path`: pure, so it is easy to test.
pub fn answer(node: &Node, path: &str) -> Response<Full<Bytes>> {
    let has_leader = node.current_leader().is_some();
    match path {
        "/metrics" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            node.metrics.render(),
        ),
        // etcd answers {"health":"true"} only while a leader is known.
        "/health" => {
            let (status, body) = if has_leader {
                (StatusCode::OK, r#"{"health":"true","reason":""}"#)
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, r#"{"health":"false","reason":"RAFT NO LEADER"}"#)
            };
            respond(status, "application/json", body.to_owned())
        }
        // Ready to serve: part of a cluster with a leader.
        "/readyz" => {
            if has_leader {
                respond(StatusCode::OK, "text/plain", "ok\n".to_owned())
            } else {
                respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "no leader\n".to_owned())
            }
        }
        // Alive while the process serves HTTP: a member without a leader must not be
        // restarted for it, or a partition would turn into a restart storm.
        "/livez" => respond(StatusCode::OK, "text/plain", "ok\n".to_owned()),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".to_owned()),
    }
}

pub async fn serve(
    listener: TcpListener,
    node: Arc<Node>,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(stop);
    loop {
        let (stream, _) = tokio::select! {
            () = &mut stop => return Ok(()),
            accepted = listener.accept() => accepted?,
        };
        let node = node.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let response = answer(&node, request.uri().path());
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
