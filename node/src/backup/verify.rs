//! Verification: a stored backup read back from its destination, its SHA-256 compared with
//! its manifest, restored (`restore`, as `consensus-node restore` does) into a scratch
//! directory, and started there as a one-member cluster of its own: a `consensus-node run`
//! process on loopback. That member is asked for HashKV at the backup's revision, which must
//! be what the cluster answered at that revision when the snapshot was taken (the manifest's
//! `hashKv`). A backup that passes restores and holds exactly what the cluster held.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;
use tonic::transport::Endpoint;

use super::Manifest;
use crate::proto::etcdserverpb::HashKvRequest;
use crate::proto::etcdserverpb::maintenance_client::MaintenanceClient;
use crate::restore::{RestoreConfig, restore};

/// How long the scratch member gets to start and answer: it replays nothing (a restored
/// member starts from its snapshot), so this is only a bound for a machine under load.
const MEMBER_START: Duration = Duration::from_secs(60);

/// Why a backup failed verification, for its manifest's reader and the operator's status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Mismatch(pub String);

/// Verifies the backup `object` as `manifest` describes it, in a scratch directory under
/// `scratch_root` that is removed after. `Ok(Err(_))`: the backup is not what its manifest
/// says; `Err(_)`: verification itself could not be carried out (the object unreadable,
/// the member not started).
pub async fn verify(
    store: &dyn ObjectStore,
    object: &ObjectPath,
    manifest: &Manifest,
    scratch_root: &Path,
) -> anyhow::Result<Result<(), Mismatch>> {
    let scratch = Scratch::new(scratch_root, &manifest.name)?;
    let snapshot = scratch.0.join("snapshot");
    let sha256 = download(store, object, &snapshot).await?;
    if sha256 != manifest.sha256 {
        return Ok(Err(Mismatch(format!(
            "the stored object's sha256 is {sha256}, its manifest says {}: it changed since it was written",
            manifest.sha256
        ))));
    }
    let ports = free_ports(3).context("ports for the scratch member")?;
    let url = |port: u16| format!("http://127.0.0.1:{port}");
    let (client, peer, metrics) = (url(ports[0]), url(ports[1]), url(ports[2]));
    let data_dir = scratch.0.join("member");
    let token = format!("verify-{}", manifest.name);
    let config = RestoreConfig {
        snapshot,
        data_dir: data_dir.clone(),
        name: "verify".to_owned(),
        initial_cluster: vec![("verify".to_owned(), peer.clone())],
        initial_cluster_token: token.clone(),
        advertise_peer_urls: vec![peer.clone()],
        replace_into: None,
    };
    if let Err(error) = tokio::task::spawn_blocking(move || restore(&config)).await? {
        return Ok(Err(Mismatch(format!("it does not restore: {error:#}"))));
    }
    let exe = std::env::current_exe().context("locating consensus-node for the scratch member")?;
    let mut member = tokio::process::Command::new(exe)
        .arg("run")
        .args(["--name", "verify", "--initial-cluster-token", &token])
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
        .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
        .args(["--listen-metrics-urls", &metrics, "--initial-cluster", &format!("verify={peer}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the scratch member")?;
    let answered = hash_kv(&client, manifest.revision).await;
    let _ = member.kill().await;
    let hashed = answered?;
    if hashed.hash != manifest.hash_kv || hashed.compact_revision != manifest.compact_revision {
        return Ok(Err(Mismatch(format!(
            "restored, it hashes to {} (compacted at {}) at revision {}; the cluster reported {} (compacted at {})",
            hashed.hash,
            hashed.compact_revision,
            manifest.revision,
            manifest.hash_kv,
            manifest.compact_revision
        ))));
    }
    Ok(Ok(()))
}

/// Streams `object` into `file`; the SHA-256 of what was read.
pub(super) async fn download(
    store: &dyn ObjectStore,
    object: &ObjectPath,
    file: &Path,
) -> anyhow::Result<String> {
    let mut stream = store.get(object).await.with_context(|| format!("reading {object} back"))?.into_stream();
    let mut out =
        tokio::fs::File::create(file).await.with_context(|| format!("creating {}", file.display()))?;
    let mut hasher = Sha256::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.with_context(|| format!("reading {object} back"))?;
        hasher.update(&chunk);
        out.write_all(&chunk).await.with_context(|| format!("writing {}", file.display()))?;
    }
    out.flush().await?;
    Ok(hex::encode(hasher.finalize()))
}

/// HashKV at `revision` from the member at `url`, asked until it answers or `MEMBER_START`
/// passes.
async fn hash_kv(url: &str, revision: i64) -> anyhow::Result<crate::proto::etcdserverpb::HashKvResponse> {
    let deadline = tokio::time::Instant::now() + MEMBER_START;
    let endpoint = Endpoint::from_shared(url.to_owned())?.connect_timeout(Duration::from_secs(1));
    loop {
        let answer = async {
            let mut client = MaintenanceClient::new(endpoint.connect().await?);
            anyhow::Ok(client.hash_kv(HashKvRequest { revision }).await?.into_inner())
        }
        .await;
        match answer {
            Ok(answer) => return Ok(answer),
            Err(error) if tokio::time::Instant::now() >= deadline => {
                bail!(
                    "the scratch member did not answer HashKV within {} s: {error:#}",
                    MEMBER_START.as_secs()
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn free_ports(count: usize) -> std::io::Result<Vec<u16>> {
    // Held together until all are known, so none is handed out twice.
    let listeners = (0..count)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// A directory of its own for one verification, removed when done, pass or fail.
struct Scratch(PathBuf);

impl Scratch {
    fn new(root: &Path, name: &str) -> anyhow::Result<Self> {
        // Only the name's plain characters: a name is user input, and this path is removed.
        let plain: String =
            name.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_')).collect();
        let dir = root.join(format!("verify-{plain}-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
