//! Backups in `make bench`: a keyspace of 256 MiB (4096 values of 64 KiB) in a fresh cluster
//! of each (with an 8 GiB quota: ours, whose store does not reuse freed pages yet, passes its
//! default 2 GiB filling it; issue 16),
//! backed up from a follower into a directory on this machine's disk: ours with
//! `consensus-node backup` (then again with `--verify`), etcd's with `etcdctl snapshot
//! save`, beside the disk's sequential write bandwidth in the same directory; and the put
//! latency of 16 clients during our backup and without one, over the same length of time.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::AsyncWriteExt;

use super::{Cluster, Role, System, Workload, drive_while, our_binary};

const KEYS: usize = 4096;
const VALUE_BYTES: usize = 64 << 10;
const FILL_CLIENTS: usize = 16;
const MIB: f64 = (1 << 20) as f64;

/// `KEYS` values of `VALUE_BYTES`, written by `FILL_CLIENTS` at once.
async fn fill(cluster: &Cluster) -> anyhow::Result<()> {
    let channels = cluster.channels(Role::Leader).await?;
    let mut tasks = Vec::new();
    for c in 0..FILL_CLIENTS {
        let mut kv = super::KvClient::new(channels[c % channels.len()].clone());
        tasks.push(tokio::spawn(async move {
            let value = vec![b'b'; VALUE_BYTES];
            for i in (c..KEYS).step_by(FILL_CLIENTS) {
                let put = super::PutRequest {
                    key: format!("bench/backup/{i:05}").into_bytes(),
                    value: value.clone(),
                    ..super::PutRequest::default()
                };
                kv.put(put).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// MB/s of writing `bytes` to a new file in `dir` and syncing it.
async fn disk_bandwidth(dir: &Path, bytes: usize) -> anyhow::Result<f64> {
    let path = dir.join("bandwidth");
    let chunk = vec![0x5a_u8; 1 << 20];
    let started = Instant::now();
    let mut file = tokio::fs::File::create(&path).await?;
    for _ in 0..bytes.div_ceil(chunk.len()) {
        file.write_all(&chunk).await?;
    }
    file.sync_all().await?;
    let took = started.elapsed();
    drop(file);
    tokio::fs::remove_file(&path).await?;
    Ok(bytes as f64 / MIB / took.as_secs_f64())
}

/// Runs `program args`, failing with its stderr; how long it took.
async fn timed(program: &Path, args: &[String]) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let output = tokio::process::Command::new(program)
        .args(args)
        .env("ETCDCTL_API", "3")
        .output()
        .await
        .with_context(|| format!("running {}", program.display()))?;
    if !output.status.success() {
        bail!("{} {}: {}", program.display(), args.join(" "), String::from_utf8_lossy(&output.stderr));
    }
    Ok(started.elapsed())
}

/// A backup of `cluster` from a follower into `dir`: how long it took and how many bytes
/// it stored.
async fn backup(cluster: &Cluster, dir: &Path, name: &str, verify: bool) -> anyhow::Result<(Duration, u64)> {
    let leader = cluster.leader(Duration::from_secs(30)).await?;
    let follower = &cluster.members[(leader + 1) % cluster.members.len()].client_url;
    std::fs::create_dir_all(dir)?;
    let (took, file) = match cluster.system {
        System::Ours => {
            let mut args: Vec<String> = ["backup", "--endpoint", follower, "--to"].map(str::to_owned).into();
            args.extend([format!("file://{}", dir.display()), "--name".to_owned(), name.to_owned()]);
            if verify {
                args.push("--verify".to_owned());
            }
            (timed(&our_binary()?, &args).await?, dir.join(format!("{name}.snapshot")))
        }
        System::Etcd { .. } => {
            let file = dir.join(format!("{name}.db"));
            let args =
                ["--endpoints", follower, "snapshot", "save", &file.display().to_string()].map(str::to_owned);
            (timed(Path::new("etcdctl"), &args).await?, file)
        }
    };
    let bytes = std::fs::metadata(&file).with_context(|| format!("{}", file.display()))?.len();
    Ok((took, bytes))
}

fn throughput(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / MIB / took.as_secs_f64()
}

/// etcd's largest recommended quota, for both.
const QUOTA: &[&str] = &["--quota-backend-bytes", "8589934592"];

/// Ours against `etcd`.
pub async fn measure(etcd: &System) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ours = &Cluster::start_with(System::Ours, &dir.path().join("ours-members"), QUOTA)?;
    let etcd = &Cluster::start_with(etcd.clone(), &dir.path().join("etcd-members"), QUOTA)?;
    ours.leader(Duration::from_secs(30)).await?;
    etcd.leader(Duration::from_secs(30)).await?;
    fill(ours).await?;
    fill(etcd).await?;
    let disk = disk_bandwidth(dir.path(), KEYS * VALUE_BYTES).await?;
    let (our_time, our_bytes) = backup(ours, &dir.path().join("ours"), "plain", false).await?;
    let (verified_time, _) = backup(ours, &dir.path().join("ours"), "verified", true).await?;
    let (etcd_time, etcd_bytes) = backup(etcd, &dir.path().join("etcd"), "snapshot", false).await?;
    println!(
        "backup of {KEYS} values of {} KiB (fresh clusters, 8 GiB quota) from a follower into a directory; the \
         disk writes {disk:.0} MB/s sequentially (1 MiB writes, one fsync) in the same place",
        VALUE_BYTES >> 10
    );
    for (what, bytes, took) in [
        ("consensus-node backup".to_owned(), our_bytes, our_time),
        ("consensus-node backup --verify".to_owned(), our_bytes, verified_time),
        (format!("etcdctl snapshot save ({})", etcd.system.name()), etcd_bytes, etcd_time),
    ] {
        println!(
            "  {what:<32} {:>7.1} MiB in {:>6.2} s: {:>6.1} MB/s, {:.2} of the disk's bandwidth",
            bytes as f64 / MIB,
            took.as_secs_f64(),
            throughput(bytes, took),
            throughput(bytes, took) / disk
        );
    }
    // The same load during a backup and then, for as long, without one.
    let (done, ended) = tokio::sync::oneshot::channel::<()>();
    let taking = async {
        let taken = backup(ours, &dir.path().join("ours"), "under-load", false).await;
        let _ = done.send(());
        taken
    };
    let load = drive_while(ours, Workload::Put, 16, Role::Leader, async {
        let _ = ended.await;
    });
    let (during, taken) = tokio::join!(load, taking);
    let (backup_time, _) = taken?;
    let during = during?;
    let quiet = drive_while(ours, Workload::Put, 16, Role::Leader, tokio::time::sleep(backup_time)).await?;
    println!(
        "puts of 16 clients to ours for {:.1} s: {:.0}/s, p99 {:.2} ms during a backup; {:.0}/s, p99 {:.2} ms \
         without ({:.2}x the p99)",
        backup_time.as_secs_f64(),
        during.ops_per_sec,
        during.p99_ms,
        quiet.ops_per_sec,
        quiet.p99_ms,
        during.p99_ms / quiet.p99_ms
    );
    Ok(())
}
