//! Container logs: the files (CRI format, written by podman's k8s-file driver, one per run)
//! and the kubelet's HTTPS endpoint `kubectl logs` goes through:
//! `GET /containerLogs/{ns}/{pod}/{container}?follow&tailLines&previous&timestamps`.
//! TLS requires a client certificate signed by the cluster CA (the API server's).

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// Where each pod's logs are, and which log files belong to running containers.
#[derive(Default)]
pub struct Index {
    pods: Mutex<HashMap<(String, String), PathBuf>>,
    live: Mutex<HashSet<PathBuf>>,
}

impl Index {
    pub fn register(&self, ns: &str, pod: &str, dir: &Path) {
        self.pods.lock().expect("log index").insert((ns.to_owned(), pod.to_owned()), dir.to_owned());
    }
    pub fn unregister(&self, ns: &str, pod: &str, dir: &Path) {
        let mut pods = self.pods.lock().expect("log index");
        if pods.get(&(ns.to_owned(), pod.to_owned())).is_some_and(|d| d == dir) {
            pods.remove(&(ns.to_owned(), pod.to_owned()));
        }
    }
    pub fn set_live(&self, file: &Path, live: bool) {
        let mut set = self.live.lock().expect("log index");
        if live {
            set.insert(file.to_owned());
        } else {
            set.remove(file);
        }
    }
    fn is_live(&self, file: &Path) -> bool {
        self.live.lock().expect("log index").contains(file)
    }
    fn dir(&self, ns: &str, pod: &str) -> Option<PathBuf> {
        self.pods.lock().expect("log index").get(&(ns.to_owned(), pod.to_owned())).cloned()
    }
}

/// `<logs>/<container>/<run>.log`: the run number is the restart count of that run.
pub fn log_file(logs_dir: &Path, container: &str, run: i32) -> PathBuf {
    logs_dir.join(container).join(format!("{run}.log"))
}

/// Run numbers with a log file, ascending.
pub fn runs(logs_dir: &Path, container: &str) -> Vec<i32> {
    let mut out: Vec<i32> = std::fs::read_dir(logs_dir.join(container))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".log")?.parse().ok())
        .collect();
    out.sort_unstable();
    out
}

/// One record of a CRI log: `<RFC3339Nano> <stdout|stderr> <P|F> <content>`.
pub fn parse_line(line: &str) -> Option<(&str, &str, bool, &str)> {
    let mut parts = line.splitn(4, ' ');
    let ts = parts.next()?;
    let stream = parts.next()?;
    let tag = parts.next()?;
    let content = parts.next().unwrap_or("");
    Some((ts, stream, tag.starts_with('P'), content))
}

/// Logical lines of a CRI log (partial records joined), each with its newline except an
/// unfinished last one; with `timestamps` each starts with the first record's time.
pub fn decode(data: &str, timestamps: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in data.split('\n').filter(|l| !l.is_empty()) {
        let Some((ts, _stream, partial, content)) = parse_line(line) else { continue };
        let buf = current.get_or_insert_with(|| if timestamps { format!("{ts} ") } else { String::new() });
        buf.push_str(content);
        if !partial {
            buf.push('\n');
            out.push(current.take().unwrap_or_default());
        }
    }
    out.extend(current);
    out
}

/// The last `n` lines (all with None).
pub fn tail(lines: Vec<String>, n: Option<usize>) -> Vec<String> {
    match n {
        Some(n) if n < lines.len() => lines[lines.len() - n..].to_vec(),
        _ => lines,
    }
}

#[derive(Debug, Default, PartialEq)]
pub struct Query {
    pub follow: bool,
    pub previous: bool,
    pub timestamps: bool,
    pub tail_lines: Option<usize>,
    pub limit_bytes: Option<usize>,
}

pub fn parse_query(q: Option<&str>) -> Query {
    let mut out = Query::default();
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, "true"));
        let yes = v == "true" || v == "1";
        match k {
            "follow" => out.follow = yes,
            "previous" => out.previous = yes,
            "timestamps" => out.timestamps = yes,
            "tailLines" => out.tail_lines = v.parse().ok(),
            "limitBytes" => out.limit_bytes = v.parse().ok(),
            _ => {}
        }
    }
    out
}

type Body = BoxBody<Bytes, std::io::Error>;

fn text(code: StatusCode, s: impl Into<String>) -> Response<Body> {
    let body = Full::new(Bytes::from(s.into())).map_err(|never: Infallible| match never {}).boxed();
    Response::builder().status(code).header("content-type", "text/plain").body(body).expect("valid response")
}

async fn handle(index: Arc<Index>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    if path == "/healthz" {
        return text(StatusCode::OK, "ok");
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let ["containerLogs", ns, pod, container] = parts.as_slice() else {
        return text(StatusCode::NOT_FOUND, "not found");
    };
    let query = parse_query(req.uri().query());
    let Some(dir) = index.dir(ns, pod) else {
        return text(StatusCode::NOT_FOUND, format!("pod {ns}/{pod} is not on this node"));
    };
    let all = runs(&dir, container);
    let chosen = if query.previous { all.len().checked_sub(2).map(|i| all[i]) } else { all.last().copied() };
    let Some(run) = chosen else {
        let what = if query.previous { "previous terminated container" } else { "container" };
        return text(StatusCode::BAD_REQUEST, format!("{what} \"{container}\" in pod \"{pod}\" not found"));
    };
    let file = log_file(&dir, container, run);
    let data = tokio::fs::read(&file).await.unwrap_or_default();
    // Only whole records: the last one may still be being written.
    let complete = data.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let lines = tail(decode(&String::from_utf8_lossy(&data[..complete]), query.timestamps), query.tail_lines);
    let mut initial = lines.concat();
    if let Some(limit) = query.limit_bytes {
        initial.truncate(limit);
    }
    if !query.follow || query.previous {
        return text(StatusCode::OK, initial);
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(16);
    let timestamps = query.timestamps;
    tokio::spawn(async move {
        if tx.send(Ok(Frame::data(Bytes::from(initial)))).await.is_err() {
            return;
        }
        let _ = follow(&index, &file, complete as u64, timestamps, &tx).await;
    });
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed();
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/plain")
        .body(body)
        .expect("valid response")
}

/// Sends what is appended to `file` until its container stops (or the client goes away).
async fn follow(
    index: &Index,
    file: &Path,
    mut offset: u64,
    timestamps: bool,
    tx: &tokio::sync::mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>,
) -> Result<()> {
    let mut pending = Vec::new();
    loop {
        let live = index.is_live(file);
        let mut f = tokio::fs::File::open(file).await?;
        f.seek(std::io::SeekFrom::Start(offset)).await?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).await?;
        offset += buf.len() as u64;
        pending.extend_from_slice(&buf);
        if let Some(i) = pending.iter().rposition(|b| *b == b'\n') {
            let chunk: Vec<u8> = pending.drain(..=i).collect();
            let out = decode(&String::from_utf8_lossy(&chunk), timestamps).concat();
            if !out.is_empty() && tx.send(Ok(Frame::data(Bytes::from(out)))).await.is_err() {
                return Ok(());
            }
        }
        if !live && buf.is_empty() {
            return Ok(());
        }
        if tx.is_closed() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// TLS settings: the serving pair, and client certificates verified against `client_ca`.
pub fn tls_config(cert: &Path, key: &Path, client_ca: &Path) -> Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(client_ca)
        .with_context(|| format!("reading {}", client_ca.display()))?
    {
        roots.add(ca?)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves until the process ends.
pub async fn serve(addr: SocketAddr, config: rustls::ServerConfig, index: Arc<Index>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    tracing::info!(%addr, "kubelet server listening");
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let index = index.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake refused");
                    return;
                }
            };
            let svc = service_fn(move |req| {
                let index = index.clone();
                async move { Ok::<_, Infallible>(handle(index, req).await) }
            });
            if let Err(e) =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc).await
            {
                tracing::debug!(%peer, error = %e, "connection");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "2026-12-01T09:58:48.1+00:00 stdout F one\n2026-12-01T09:58:48.2+00:00 stdout P par\n2026-12-01T09:58:48.3+00:00 stderr F tial\n2026-12-01T09:58:48.4+00:00 stdout F three\n";

    #[test]
    fn cri_records_become_lines() {
        assert_eq!(decode(LOG, false), vec!["one\n", "partial\n", "three\n"]);
        assert_eq!(decode(LOG, true)[1], "2026-12-01T09:58:48.2+00:00 partial\n");
        assert_eq!(decode("t stdout P unfinished\n", false), vec!["unfinished"]);
        assert_eq!(decode("t stdout F \n", false), vec!["\n"], "an empty line stays a line");
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail(decode(LOG, false), Some(2)), vec!["partial\n", "three\n"]);
        assert_eq!(tail(decode(LOG, false), Some(10)).len(), 3);
        assert_eq!(tail(decode(LOG, false), Some(0)).len(), 0);
    }

    #[test]
    fn query_flags() {
        let q = parse_query(Some("follow=true&tailLines=5&previous=false&timestamps=1"));
        assert_eq!(
            q,
            Query { follow: true, previous: false, timestamps: true, tail_lines: Some(5), limit_bytes: None }
        );
        assert_eq!(parse_query(None), Query::default());
    }

    #[test]
    fn runs_are_found_in_order() {
        let dir = tempfile::tempdir().unwrap();
        for run in [0, 10, 2] {
            let f = log_file(dir.path(), "c", run);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, "").unwrap();
        }
        assert_eq!(runs(dir.path(), "c"), vec![0, 2, 10]);
        assert!(runs(dir.path(), "other").is_empty());
    }
}
