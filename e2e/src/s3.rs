//! A real S3-compatible server for tests, in-process: s3s-fs serving a directory (each
//! top-level directory a bucket), with one access key pair.

use std::net::IpAddr;
use std::path::Path;

pub const ACCESS_KEY: &str = "backup-test-key";
pub const SECRET_KEY: &str = "backup-test-secret";

/// Serves `root` on a free port of `address` until the runtime it runs on ends; its URL.
/// Loopback for a test on this machine; the pod bridge's address for pods to reach it.
pub async fn serve(root: &Path, address: IpAddr) -> String {
    let fs = s3s_fs::FileSystem::new(root).expect("an s3s-fs root");
    let mut builder = s3s::service::S3ServiceBuilder::new(fs);
    builder.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
    let service = builder.build();
    let listener = tokio::net::TcpListener::bind((address, 0)).await.expect("a port");
    let bound = listener.local_addr().expect("its address");
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let service = service.clone();
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(socket);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    format!("http://{bound}")
}

/// A server on loopback with one bucket, `bucket`, and its root directory.
pub async fn with_bucket(bucket: &str) -> (tempfile::TempDir, String) {
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(root.path().join(bucket)).expect("the bucket");
    let url = serve(root.path(), IpAddr::from([127, 0, 0, 1])).await;
    (root, url)
}
