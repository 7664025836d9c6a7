//! `consensus-node backup`: one member's snapshot streamed straight to where backups live,
//! an S3-compatible bucket or a directory, with a manifest beside it.
//!
//! The snapshot is the Maintenance.Snapshot stream, stored as it comes: the concatenated
//! blobs are the snapshot file, which ends in the SHA-256 of what precedes it, so the stored
//! object restores as it is (`consensus-node restore --snapshot`). That checksum is checked
//! before the upload is completed, so a stream cut or corrupted on the way is never stored
//! as a backup. Uploads are atomic: a multipart upload completed only at the end on S3, a
//! staged file renamed into place in a directory; the manifest `<name>.json` is written
//! after the object, so a manifest always names a complete object. The manifest carries
//! what verification later compares: the HashKV of the store at the snapshot's revision as
//! the member reported it when the snapshot was taken. With a retention policy, the backups
//! beyond it are deleted after the new one is stored (`retention`), from the manifests in
//! the destination: the command that writes backups is the one that prunes them, on both
//! platforms.

pub mod retention;
pub mod verify;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, RetryConfig, WriteMultipart};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;
use tonic::transport::Endpoint;

use crate::proto::etcdserverpb::maintenance_client::MaintenanceClient;
use crate::proto::etcdserverpb::{HashKvRequest, SnapshotRequest, StatusRequest};

/// The snapshot file's trailer: the SHA-256 of everything before it.
const CHECKSUM_LEN: usize = 32;

/// Where backups are written: `s3://bucket/prefix` or `file:///absolute/dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    S3 { bucket: String, prefix: String },
    Directory(std::path::PathBuf),
}

impl std::str::FromStr for Destination {
    type Err = anyhow::Error;

    fn from_str(url: &str) -> anyhow::Result<Self> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                bail!("{url:?} names no bucket: s3://BUCKET/PREFIX");
            }
            return Ok(Self::S3 { bucket: bucket.to_owned(), prefix: prefix.trim_matches('/').to_owned() });
        }
        if let Some(path) = url.strip_prefix("file://") {
            let path = std::path::PathBuf::from(path);
            if !path.is_absolute() {
                bail!("{url:?}: a directory destination is file:///ABSOLUTE/PATH");
            }
            return Ok(Self::Directory(path));
        }
        bail!("{url:?} is neither s3://BUCKET/PREFIX nor file:///DIR")
    }
}

/// How to reach an S3-compatible store; the credentials come from the environment
/// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`), never from flags a process list shows.
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// For stores other than AWS (`http://minio:9000`); `http://` is allowed.
    pub endpoint: Option<String>,
    pub region: String,
    /// `endpoint/bucket/key` addressing, which most self-hosted stores need.
    pub path_style: bool,
}

#[derive(Debug, Clone)]
pub struct BackupConfig {
    /// Client URL of the member to take the snapshot from.
    pub endpoint: String,
    pub destination: Destination,
    pub s3: S3Options,
    /// The backup's name: the object is `<name>.snapshot`, its manifest `<name>.json`.
    pub name: String,
    /// Applied to the destination's backups once this one is stored; `None` keeps them all.
    pub retention: Option<retention::Policy>,
    /// Verify the backup once stored (`verify`), with scratch space under this directory.
    pub verify_in: Option<std::path::PathBuf>,
}

/// What `backup` did: printed as JSON for whoever ran it (the operator).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub manifest: Manifest,
    /// Names of the backups retention deleted.
    pub pruned: Vec<String>,
}

/// Names of pruned backups a report file lists at most: a Job's termination message, which
/// carries it, is cut at 4 KiB, and a cut report would turn a good backup into a failure.
const REPORTED_PRUNED: usize = 20;

impl Report {
    /// The report as the report file carries it: all of the manifest, the first pruned
    /// names and how many more there were.
    pub fn for_report_file(&self) -> Self {
        let mut report = self.clone();
        if report.pruned.len() > REPORTED_PRUNED {
            let more = report.pruned.len() - REPORTED_PRUNED;
            report.pruned.truncate(REPORTED_PRUNED);
            report.pruned.push(format!("(and {more} more)"));
        }
        report
    }
}

/// What `backup --report FILE` writes when it is done, for the operator that ran it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    Succeeded(Box<Report>),
    Failed { error: String },
}

/// What is stored beside each backup, and what `backup` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub name: String,
    /// Where the object is: `s3://bucket/key` or `file:///path`.
    pub location: String,
    /// SHA-256 (hex) of the stored bytes.
    pub sha256: String,
    pub size_bytes: u64,
    /// The store revision the snapshot holds.
    pub revision: i64,
    /// HashKV at `revision` as the member reported it right after the snapshot.
    pub hash_kv: u32,
    /// The compacted revision HashKV reported.
    pub compact_revision: i64,
    /// Hex, as etcdctl prints it.
    pub cluster_id: String,
    pub member_id: String,
    pub member_version: String,
    /// When the snapshot was taken (RFC 3339, UTC).
    pub taken: String,
    /// Set once the backup was restored and compared; absent until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
    /// Why verification failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<String>,
}

/// The object store and the key prefix of `destination`.
fn open(destination: &Destination, s3: &S3Options) -> anyhow::Result<(Arc<dyn ObjectStore>, String, String)> {
    match destination {
        Destination::Directory(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let store = LocalFileSystem::new_with_prefix(dir)
                .with_context(|| format!("opening {}", dir.display()))?;
            Ok((Arc::new(store), String::new(), format!("file://{}", dir.display())))
        }
        Destination::S3 { bucket, prefix } => {
            // A few quick retries ride out a blip; a store that stays away fails the run in
            // seconds, not the minutes of the default, and the operator tries the run again
            // with its own back-off, saying why in status meanwhile.
            let retry = RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(20),
                ..RetryConfig::default()
            };
            let mut builder = AmazonS3Builder::from_env()
                .with_retry(retry)
                .with_bucket_name(bucket)
                .with_region(&s3.region)
                .with_virtual_hosted_style_request(!s3.path_style);
            if let Some(endpoint) = &s3.endpoint {
                builder = builder.with_endpoint(endpoint).with_allow_http(endpoint.starts_with("http://"));
            }
            let store = builder.build().with_context(|| format!("configuring s3://{bucket}"))?;
            Ok((Arc::new(store), prefix.clone(), format!("s3://{bucket}")))
        }
    }
}

fn key(prefix: &str, file: &str) -> ObjectPath {
    if prefix.is_empty() { ObjectPath::from(file) } else { ObjectPath::from(format!("{prefix}/{file}")) }
}

/// Takes the backup: the snapshot streamed into the destination, then its manifest, then
/// retention.
pub async fn backup(config: &BackupConfig) -> anyhow::Result<Report> {
    // HTTPS to a store uses rustls with ring; installing it twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (store, prefix, root) = open(&config.destination, &config.s3)?;
    // Reached, allowed and there before the member is asked for anything: a wrong bucket,
    // endpoint or key fails here, and never after a snapshot was taken for nothing.
    store.list_with_delimiter(Some(&ObjectPath::from(prefix.as_str()))).await.with_context(|| {
        format!("{root}/{prefix} cannot be listed (is the bucket there, and the credentials right?)")
    })?;
    let channel = Endpoint::from_shared(config.endpoint.clone())
        .with_context(|| format!("{:?} is not a URL", config.endpoint))?
        .connect()
        .await
        .with_context(|| format!("connecting to {}", config.endpoint))?;
    let mut maintenance = MaintenanceClient::new(channel);
    let status = maintenance.status(StatusRequest {}).await.context("Status")?.into_inner();
    let header = status.header.unwrap_or_default();

    let object = key(&prefix, &format!("{}.snapshot", config.name));
    let mut stream = maintenance.snapshot(SnapshotRequest {}).await.context("Snapshot")?.into_inner();
    let upload = store.put_multipart(&object).await.with_context(|| format!("starting {root}/{object}"))?;
    let mut writer = WriteMultipart::new(upload);
    let mut stored = Sha256::new();
    let mut body = Sha256::new();
    let mut size = 0u64;
    let mut revision = 0;
    // The last CHECKSUM_LEN bytes seen are held back from `body` until more arrive: they are
    // the trailer only if nothing follows them.
    let mut tail: Vec<u8> = Vec::new();
    let streamed: anyhow::Result<()> = async {
        while let Some(message) = stream.next().await {
            let message = message.context("the snapshot stream broke off")?;
            if let Some(header) = &message.header {
                revision = header.revision;
            }
            stored.update(&message.blob);
            size += message.blob.len() as u64;
            tail.extend_from_slice(&message.blob);
            if tail.len() > CHECKSUM_LEN {
                let body_part = tail.len() - CHECKSUM_LEN;
                body.update(&tail[..body_part]);
                tail.drain(..body_part);
            }
            writer.write(&message.blob);
        }
        if tail.len() != CHECKSUM_LEN || body.clone().finalize().as_slice() != tail.as_slice() {
            bail!("the snapshot's checksum does not match its content: not stored");
        }
        Ok(())
    }
    .await;
    // What verification will compare with, asked before the upload completes: a backup
    // without it is not stored.
    let hash = match streamed {
        Ok(()) => {
            maintenance.hash_kv(HashKvRequest { revision }).await.context("HashKV").map(|r| r.into_inner())
        }
        Err(error) => Err(error),
    };
    let hash = match hash {
        Ok(hash) => hash,
        Err(error) => {
            // Nothing half-written stays behind.
            let _ = writer.abort().await;
            return Err(error);
        }
    };
    writer.finish().await.with_context(|| format!("completing {root}/{object}"))?;

    let manifest = Manifest {
        name: config.name.clone(),
        location: format!("{root}/{object}"),
        sha256: hex::encode(stored.finalize()),
        size_bytes: size,
        revision,
        hash_kv: hash.hash,
        compact_revision: hash.compact_revision,
        cluster_id: format!("{:x}", header.cluster_id),
        member_id: format!("{:x}", header.member_id),
        member_version: status.version,
        taken: jiff::Timestamp::now()
            .round(jiff::Unit::Second)
            .unwrap_or_else(|_| jiff::Timestamp::now())
            .to_string(),
        verified: None,
        verification: None,
    };
    let manifest_key = key(&prefix, &format!("{}.json", config.name));
    if let Err(error) = write_manifest(store.as_ref(), &manifest_key, &manifest).await {
        // An object without its manifest is no backup, and retention would never see it.
        let _ = store.delete(&object).await;
        return Err(error).with_context(|| format!("writing {root}/{manifest_key}"));
    }
    let mut manifest = manifest;
    if let Some(scratch) = &config.verify_in {
        verify_and_record(store.as_ref(), &object, &manifest_key, &mut manifest, scratch).await?;
    }
    let pruned = match &config.retention {
        Some(policy) => prune(store.as_ref(), &prefix, &root, policy, &manifest.cluster_id).await?,
        None => Vec::new(),
    };
    Ok(Report { manifest, pruned })
}

async fn write_manifest(
    store: &dyn ObjectStore,
    key: &ObjectPath,
    manifest: &Manifest,
) -> anyhow::Result<()> {
    let json = serde_json::to_vec_pretty(manifest).context("encoding the manifest")?;
    store.put(key, PutPayload::from(json)).await?;
    Ok(())
}

/// Verifies the stored backup and records the verdict in its manifest: a backup that could
/// not be verified counts as not verified, with why.
async fn verify_and_record(
    store: &dyn ObjectStore,
    object: &ObjectPath,
    manifest_key: &ObjectPath,
    manifest: &mut Manifest,
    scratch: &std::path::Path,
) -> anyhow::Result<()> {
    let verdict = match verify::verify(store, object, manifest, scratch).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(mismatch)) => Err(mismatch.0),
        Err(error) => Err(format!("it could not be verified: {error:#}")),
    };
    manifest.verified = Some(verdict.is_ok());
    manifest.verification = verdict.err();
    write_manifest(store, manifest_key, manifest)
        .await
        .with_context(|| format!("recording the verdict in {manifest_key}"))
}

/// The manifest of the backup `name` under `prefix`, and its key.
async fn read_manifest(
    store: &dyn ObjectStore,
    prefix: &str,
    root: &str,
    name: &str,
) -> anyhow::Result<(ObjectPath, Manifest)> {
    let manifest_key = key(prefix, &format!("{name}.json"));
    let bytes = store
        .get(&manifest_key)
        .await
        .with_context(|| format!("reading {root}/{manifest_key}"))?
        .bytes()
        .await?;
    let manifest = serde_json::from_slice(&bytes)
        .with_context(|| format!("{root}/{manifest_key} is no backup manifest"))?;
    Ok((manifest_key, manifest))
}

/// Verifies the backup `name` stored in `destination` again (it may have changed since it
/// was written) and records the verdict in its manifest, which is returned.
pub async fn verify_stored(
    destination: &Destination,
    s3: &S3Options,
    name: &str,
    scratch: &std::path::Path,
) -> anyhow::Result<Manifest> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (store, prefix, root) = open(destination, s3)?;
    let (manifest_key, mut manifest) = read_manifest(store.as_ref(), &prefix, &root, name).await?;
    let object = key(&prefix, &format!("{name}.snapshot"));
    verify_and_record(store.as_ref(), &object, &manifest_key, &mut manifest, scratch).await?;
    Ok(manifest)
}

/// Fetches the backup `name` stored in `destination` into the file `to`, for a restore: read
/// into a staged file beside it and renamed into place only once its sha256 is what its
/// manifest says, so `to` is never a partial or changed object. Returns the manifest.
pub async fn fetch(
    destination: &Destination,
    s3: &S3Options,
    name: Option<&str>,
    to: &std::path::Path,
) -> anyhow::Result<Manifest> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (store, prefix, root) = open(destination, s3)?;
    let (name, manifest) = match name {
        Some(name) => (name.to_owned(), read_manifest(store.as_ref(), &prefix, &root, name).await?.1),
        None => newest_verified(store.as_ref(), &prefix, &root).await?,
    };
    let name = name.as_str();
    let object = key(&prefix, &format!("{name}.snapshot"));
    if let Some(dir) = to.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let staged = to.with_extension("fetching");
    let sha256 = verify::download(store.as_ref(), &object, &staged).await?;
    if sha256 != manifest.sha256 {
        let _ = std::fs::remove_file(&staged);
        bail!(
            "{root}/{object} has sha256 {sha256}, its manifest says {}: it changed since it was written",
            manifest.sha256
        );
    }
    std::fs::File::open(&staged)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", staged.display()))?;
    std::fs::rename(&staged, to).with_context(|| format!("renaming into {}", to.display()))?;
    Ok(manifest)
}

/// The backup taken last of those verified whose object is there (retention deletes the
/// object first, so an interrupted prune can leave a manifest alone): what a new cluster is
/// made from when no backup is named. One that failed verification, or was never verified,
/// is never chosen.
async fn newest_verified(
    store: &dyn ObjectStore,
    prefix: &str,
    root: &str,
) -> anyhow::Result<(String, Manifest)> {
    let mut verified: Vec<(jiff::Timestamp, Manifest)> = stored(store, prefix, None)
        .await?
        .into_iter()
        .filter(|m| m.verified == Some(true))
        .filter_map(|m| Some((m.taken.parse::<jiff::Timestamp>().ok()?, m)))
        .collect();
    verified.sort_by(|(a, m), (b, n)| b.cmp(a).then_with(|| n.name.cmp(&m.name)));
    for (_, manifest) in verified {
        match store.head(&key(prefix, &format!("{}.snapshot", manifest.name))).await {
            Ok(_) => return Ok((manifest.name.clone(), manifest)),
            Err(object_store::Error::NotFound { .. }) => {
                tracing::warn!(backup = %manifest.name, "a verified manifest without its snapshot; skipped");
            }
            Err(error) => return Err(error).with_context(|| format!("reading {root}/{prefix}")),
        }
    }
    bail!("no verified backup in {root}/{prefix}")
}

/// The backups directly under `prefix`, from their manifests: of cluster `cluster_id`, or of
/// any when it is `None`. An object without a readable manifest, another cluster's backup
/// sharing the place, or anything under a deeper prefix is not ours to judge and is left
/// alone.
async fn stored(
    store: &dyn ObjectStore,
    prefix: &str,
    cluster_id: Option<&str>,
) -> anyhow::Result<Vec<Manifest>> {
    let listed =
        store.list_with_delimiter(Some(&ObjectPath::from(prefix))).await.context("listing the backups")?;
    let mut manifests = Vec::new();
    for object in listed.objects.iter().filter(|o| o.location.as_ref().ends_with(".json")) {
        let bytes = store.get(&object.location).await?.bytes().await?;
        match serde_json::from_slice::<Manifest>(&bytes) {
            Ok(manifest) if cluster_id.is_none_or(|id| manifest.cluster_id == id) => manifests.push(manifest),
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(object = %object.location, %error, "not a backup manifest; left alone")
            }
        }
    }
    Ok(manifests)
}

/// Deletes the backups of `cluster_id` that `policy` does not keep, object before manifest,
/// so a manifest never names a missing object for long; returns the names deleted.
async fn prune(
    store: &dyn ObjectStore,
    prefix: &str,
    root: &str,
    policy: &retention::Policy,
    cluster_id: &str,
) -> anyhow::Result<Vec<String>> {
    let manifests = stored(store, prefix, Some(cluster_id)).await?;
    let backups: Vec<retention::Stored> = manifests
        .iter()
        .filter_map(|m| {
            let taken = m.taken.parse().ok()?;
            Some(retention::Stored { name: m.name.clone(), taken, verified: m.verified })
        })
        .collect();
    let doomed = retention::to_delete(&backups, policy, jiff::Timestamp::now());
    for name in &doomed {
        for file in [format!("{name}.snapshot"), format!("{name}.json")] {
            let object = key(prefix, &file);
            match store.delete(&object).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(error) => return Err(error).with_context(|| format!("deleting {root}/{object}")),
            }
        }
    }
    Ok(doomed.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_file_names_few_pruned_backups_and_counts_the_rest() {
        let manifest = Manifest {
            name: "n".to_owned(),
            location: "file:///b/n.snapshot".to_owned(),
            sha256: "ab".repeat(32),
            size_bytes: 1,
            revision: 1,
            hash_kv: 1,
            compact_revision: 0,
            cluster_id: "1".to_owned(),
            member_id: "2".to_owned(),
            member_version: "0.1.0".to_owned(),
            taken: "2026-12-01T10:00:00Z".to_owned(),
            verified: Some(true),
            verification: None,
        };
        let pruned: Vec<String> =
            (0..150).map(|i| format!("cluster-with-a-long-name-20261201T{i:06}Z")).collect();
        let report = Report { manifest, pruned };
        let filed = report.for_report_file();
        assert_eq!(filed.pruned.len(), REPORTED_PRUNED + 1);
        assert_eq!(filed.pruned.last().map(String::as_str), Some("(and 130 more)"));
        let json = serde_json::to_string(&Outcome::Succeeded(Box::new(filed))).expect("json");
        assert!(json.len() < 4096, "{} bytes do not fit a termination message", json.len());
    }
}
