//! `consensus-node`: run a member, or a development cluster of several on this machine.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use consensus_node::restore::RestoreConfig;
use consensus_node::server::{ClusterState, LOST_DATA_EXIT_CODE, LostVoterData, MemberConfig, run};

/// mimalloc, but glibc's malloc for the store's page buffers: see `allocator`.
#[global_allocator]
static ALLOCATOR: consensus_node::allocator::MemberAllocator = consensus_node::allocator::MemberAllocator;

/// mimalloc asks the kernel for transparent huge pages for its memory, so a page fault clears
/// 2 MiB at a time. A request that allocates much at once then spent most of its time in the
/// kernel doing that: applying a DeleteRange of 150,000 keys of etcdctl's `check perf` took
/// 4.5 s with them and 1.0 s without, its 150,000 puts 7.4 s and 4.7 s. etcd's Go heap does not
/// ask for them either. (Set on the process: every later fault of any thread obeys it.)
fn disable_transparent_huge_pages() -> std::io::Result<()> {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and touches no memory.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[derive(Parser)]
#[command(version, about = "A Raft key-value member speaking the etcd v3 API")]
struct Cli {
    /// Threads that serve requests and drive Raft (fsyncs and the store's writes have
    /// threads of their own). By default one per CPU this process may use, its cgroup's
    /// CPU limit counted. Members that share a machine do better with its CPUs divided
    /// among them (`consensus-operator local` does so): three members on two CPUs with
    /// one thread each made 1.1 times the puts of two each at 16 and 256 clients.
    #[arg(long, global = true, env = "CONSENSUS_WORKER_THREADS")]
    worker_threads: Option<NonZeroUsize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one member (flags as etcd's, each also settable from the environment).
    Run(Box<RunArgs>),
    /// Start N members on loopback, print their endpoints, stop them all on Ctrl-C.
    DevCluster(DevClusterArgs),
    /// Build a member's data directory from a snapshot, as the first state of a NEW cluster.
    #[command(long_about = RESTORE_HELP)]
    Restore(RestoreArgs),
    /// Stream a member's snapshot to an S3-compatible bucket or a directory, with a manifest.
    #[command(long_about = BACKUP_HELP)]
    Backup(BackupArgs),
    /// Check a stored backup: read it back, check its sha256, restore it into a scratch
    /// member and compare HashKV at its revision with its manifest; the verdict is recorded
    /// in the manifest. Exits 1 when it fails.
    Verify(VerifyArgs),
    /// Download a stored backup into a file for `restore --snapshot`, its sha256 checked
    /// against its manifest first; prints the manifest.
    Fetch(FetchArgs),
}

const BACKUP_HELP: &str = "\
Stream one member's snapshot (Maintenance.Snapshot) to --to, as <name>.snapshot, and write
<name>.json beside it: SHA-256 and size of the stored bytes, the revision, HashKV at that
revision, cluster and member id, version, time. The snapshot's own checksum is checked before
the upload completes, so nothing partial or corrupt is ever stored under the name. Prints the
manifest. The stored object restores as it is: consensus-node restore --snapshot FILE.

--to s3://BUCKET/PREFIX takes its credentials from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY;
--to file:///DIR writes into a directory.";

#[derive(clap::Args)]
struct BackupArgs {
    /// Client URL of the member to take the snapshot from (a follower spares the leader).
    #[arg(long, env = "BACKUP_ENDPOINT")]
    endpoint: String,
    /// s3://BUCKET/PREFIX or file:///DIR.
    #[arg(long, env = "BACKUP_TO")]
    to: consensus_node::backup::Destination,
    /// The backup's name: <name>.snapshot and <name>.json.
    #[arg(long, env = "BACKUP_NAME")]
    name: String,
    #[command(flatten)]
    store: StoreArgs,
    /// After storing, keep at most this many backups in --to (none deleted without it).
    #[arg(long, env = "BACKUP_RETAIN_COUNT")]
    retain_count: Option<usize>,
    /// ... and none older than this many seconds (the newest verified one always stays).
    #[arg(long, env = "BACKUP_RETAIN_MAX_AGE_SECONDS", requires = "retain_count")]
    retain_max_age_seconds: Option<u64>,
    /// ... and only the newest of each hour for a day, each day for a week, each week for a month.
    #[arg(long, env = "BACKUP_RETAIN_TIERED", requires = "retain_count")]
    retain_tiered: bool,
    /// Also write the outcome to this file when done, as JSON: {"succeeded":{REPORT}} or
    /// {"failed":{"error":"..."}} (for the operator: a Job's /dev/termination-log).
    #[arg(long, env = "BACKUP_REPORT")]
    report: Option<std::path::PathBuf>,
    /// Once stored, read the backup back, restore it into a scratch member and compare its
    /// HashKV with the cluster's; the verdict goes into the manifest (verified, verification).
    #[arg(long, env = "BACKUP_VERIFY")]
    verify: bool,
    /// Where the scratch member of --verify lives while it runs.
    #[arg(long, env = "BACKUP_SCRATCH_DIR", default_value_os_t = std::env::temp_dir())]
    scratch_dir: PathBuf,
}

/// How to reach an S3-compatible store (credentials from AWS_ACCESS_KEY_ID and
/// AWS_SECRET_ACCESS_KEY).
#[derive(clap::Args)]
struct StoreArgs {
    /// S3 endpoint for stores other than AWS (http:// allowed).
    #[arg(long, env = "BACKUP_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    #[arg(long, env = "BACKUP_S3_REGION", default_value = "us-east-1")]
    s3_region: String,
    /// endpoint/bucket/key addressing (most self-hosted stores need it).
    #[arg(long, env = "BACKUP_S3_PATH_STYLE")]
    s3_path_style: bool,
}

impl StoreArgs {
    fn options(self) -> consensus_node::backup::S3Options {
        consensus_node::backup::S3Options {
            endpoint: self.s3_endpoint,
            region: self.s3_region,
            path_style: self.s3_path_style,
        }
    }
}

/// Where backups stored earlier are.
#[derive(clap::Args)]
struct StoredBackupArgs {
    /// s3://BUCKET/PREFIX or file:///DIR, where the backup is.
    #[arg(long)]
    from: consensus_node::backup::Destination,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(clap::Args)]
struct FetchArgs {
    #[command(flatten)]
    stored: StoredBackupArgs,
    /// The backup's name: <name>.snapshot and <name>.json.
    #[arg(long, required_unless_present = "newest", conflicts_with = "newest")]
    name: Option<String>,
    /// The newest verified backup in --from, of whichever cluster (a new cluster made from
    /// the backups of one deleted).
    #[arg(long)]
    newest: bool,
    /// The file to write the snapshot to.
    #[arg(long)]
    to: PathBuf,
}

#[derive(clap::Args)]
struct VerifyArgs {
    #[command(flatten)]
    stored: StoredBackupArgs,
    /// The backup's name: <name>.snapshot and <name>.json.
    #[arg(long)]
    name: String,
    /// Where the scratch member lives while it runs.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    scratch_dir: PathBuf,
}

const RESTORE_HELP: &str = "\
Build a member's data directory from a snapshot file (`etcdctl snapshot save`, or the
Maintenance.Snapshot stream saved as is), as the first state of a NEW cluster: a new
cluster id, new member ids, every key and revision of the snapshot.

Restore EVERY member of the new cluster from the SAME snapshot file with the SAME
--initial-cluster and --initial-cluster-token (each with its own --name, --data-dir and
--initial-advertise-peer-urls), then start each with `consensus-node run` and the same
flags. Members restored from different files or flags disagree about the cluster and
refuse each other. Use a new --initial-cluster-token, so the new cluster is never mistaken
for the old one.

The snapshot's checksum is verified first: a damaged file is refused and nothing is
created. The data directory must be absent or empty, unless --replace-into names where
what it holds goes.";

#[derive(clap::Args)]
struct RestoreArgs {
    /// The snapshot file to restore.
    #[arg(long)]
    snapshot: PathBuf,
    /// The new member's data directory; must not exist or be empty.
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long, default_value = "default")]
    name: String,
    /// `name=peer-url,...`: every member of the new cluster (defaults to this member alone).
    #[arg(long, value_delimiter = ',')]
    initial_cluster: Vec<String>,
    #[arg(long, default_value = "etcd-cluster")]
    initial_cluster_token: String,
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2380")]
    initial_advertise_peer_urls: Vec<String>,
    /// Replace the member in --data-dir: what it holds is moved into this directory first
    /// (kept, never deleted), and a --data-dir this same restore (same snapshot name, flags
    /// and token) made before is left as it is, so a retried restore succeeds.
    #[arg(long)]
    replace_into: Option<PathBuf>,
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    #[arg(long, env = "ETCD_NAME", default_value = "default")]
    name: String,
    #[arg(long, env = "ETCD_DATA_DIR", default_value = "default.etcd")]
    data_dir: PathBuf,
    #[arg(
        long,
        env = "ETCD_LISTEN_CLIENT_URLS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    listen_client_urls: Vec<String>,
    #[arg(
        long,
        env = "ETCD_ADVERTISE_CLIENT_URLS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    advertise_client_urls: Vec<String>,
    #[arg(
        long,
        env = "ETCD_LISTEN_PEER_URLS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2380"
    )]
    listen_peer_urls: Vec<String>,
    #[arg(
        long,
        env = "ETCD_INITIAL_ADVERTISE_PEER_URLS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2380"
    )]
    initial_advertise_peer_urls: Vec<String>,
    /// `name=peer-url,...`; defaults to this member alone.
    #[arg(long, env = "ETCD_INITIAL_CLUSTER", value_delimiter = ',')]
    initial_cluster: Vec<String>,
    #[arg(long, env = "ETCD_INITIAL_CLUSTER_STATE", value_enum, default_value = "new")]
    initial_cluster_state: ClusterState,
    #[arg(long, env = "ETCD_INITIAL_CLUSTER_TOKEN", default_value = "etcd-cluster")]
    initial_cluster_token: String,
    #[arg(
        long,
        env = "ETCD_LISTEN_METRICS_URLS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2381"
    )]
    listen_metrics_urls: Vec<String>,
    /// Milliseconds between heartbeats.
    #[arg(long, env = "ETCD_HEARTBEAT_INTERVAL", default_value_t = 100)]
    heartbeat_interval: u64,
    /// Milliseconds without a leader before an election.
    #[arg(long, env = "ETCD_ELECTION_TIMEOUT", default_value_t = 1000)]
    election_timeout: u64,
    /// Applied entries between automatic snapshots (etcd's default). A snapshot makes the
    /// store durable so the log before it can go (a follower that needs one is sent a copy
    /// of the store); `--snapshot-bytes` also bounds the log between them.
    #[arg(long, env = "ETCD_SNAPSHOT_COUNT", default_value_t = 100_000)]
    snapshot_count: u64,
    /// Entries kept behind a snapshot so slow followers catch up from the log.
    #[arg(long, env = "ETCD_SNAPSHOT_CATCHUP_ENTRIES", default_value_t = 5_000)]
    snapshot_catchup_entries: u64,
    /// WAL bytes written since the last snapshot that trigger another: a bound on the log's
    /// files for large values, where `--snapshot-count` entries would take gigabytes. It
    /// sits above what 100,000 entries of etcdctl's `check perf` write (1 KiB values, about
    /// 120 MB), so that etcd's count decides for values of that size; at 64 MiB each member
    /// took three snapshots per `check perf --load=l` instead of one, 1-2.5 s each, and made
    /// 4-8 % fewer writes.
    #[arg(long, env = "ETCD_SNAPSHOT_BYTES", default_value_t = 256 << 20)]
    snapshot_bytes: u64,
    /// Payload bytes of the newest Raft log entries held in memory; older entries, such as
    /// those kept behind a snapshot for slow followers, are read back from the WAL.
    #[arg(long, default_value_t = 64 << 20)]
    wal_held_bytes: u64,
    /// Bytes of the store's pages, read or written, the member keeps in its own memory
    /// (redb's cache; the kernel's page cache holds the file as well). A member under
    /// memory pressure may take less: after `etcdctl check perf --load=l` a member kept
    /// 0.9-1.0 GB with the default, 1 GiB, and 0.5-0.7 GB with 128 MiB; but with 128 MiB
    /// the slowest request took 1.4-1.7 s in two runs of four, one with a leader change
    /// (0.27-0.67 s in five runs with the default), and the cluster made 7 % fewer writes.
    #[arg(long, default_value_t = 1 << 30)]
    store_cache_bytes: usize,
    /// Period of the progress notifications of watchers that ask for them (`500ms`, `10s`,
    /// `10m`, `1h`).
    #[arg(
        long,
        env = "ETCD_EXPERIMENTAL_WATCH_PROGRESS_NOTIFY_INTERVAL",
        default_value = "10m",
        value_parser = duration
    )]
    experimental_watch_progress_notify_interval: Duration,
    /// The store's size limit in bytes; past it writes are refused (NOSPACE alarm) while
    /// reads and deletes go on. 0 means etcd's default, 2 GiB.
    #[arg(long, env = "ETCD_QUOTA_BACKEND_BYTES", default_value_t = 0)]
    quota_backend_bytes: u64,
}

/// A Go-style duration with one unit, as etcd's duration flags are usually written.
fn duration(text: &str) -> Result<Duration, String> {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 10s"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number * 60),
        "h" => Duration::from_secs(number * 3600),
        _ => return Err(format!("{text:?}: the unit must be ms, s, m or h")),
    };
    if duration.is_zero() {
        return Err("the duration must be positive".to_owned());
    }
    Ok(duration)
}

#[derive(clap::Args)]
struct DevClusterArgs {
    #[arg(long, default_value_t = 3)]
    members: usize,
    #[arg(long)]
    base_dir: PathBuf,
    /// First of 3 consecutive ports per member (client, peer, metrics).
    #[arg(long, default_value_t = 23790)]
    base_port: u16,
}

/// `http://host:port` to a socket address to bind.
fn socket(url: &str) -> anyhow::Result<SocketAddr> {
    let uri: http::Uri = url.parse().with_context(|| format!("invalid URL {url:?}"))?;
    let host = uri.host().with_context(|| format!("URL {url:?} has no host"))?;
    let port = uri.port_u16().with_context(|| format!("URL {url:?} has no port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip = if host == "localhost" {
        "127.0.0.1".parse()?
    } else {
        host.parse().with_context(|| format!("URL {url:?}: host must be an IP address"))?
    };
    Ok(SocketAddr::new(ip, port))
}

fn sockets(urls: &[String]) -> anyhow::Result<Vec<SocketAddr>> {
    urls.iter().map(|u| socket(u)).collect()
}

/// `--initial-cluster` as `(name, peer-url)` pairs; empty means this member alone. An empty
/// entry is no entry: `--initial-cluster=` (an empty variable, as a workload of no members yet
/// writes it) means the same as no flag.
fn parse_initial_cluster(
    pairs: &[String],
    name: &str,
    advertise_peer_urls: &[String],
) -> anyhow::Result<Vec<(String, String)>> {
    let pairs: Vec<&String> = pairs.iter().filter(|p| !p.trim().is_empty()).collect();
    if pairs.is_empty() {
        return Ok(advertise_peer_urls.iter().map(|u| (name.to_owned(), u.clone())).collect());
    }
    pairs
        .into_iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(n, u)| (n.to_owned(), u.to_owned()))
                .with_context(|| format!("--initial-cluster entry {pair:?} is not name=peer-url"))
        })
        .collect()
}

fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let config = RestoreConfig {
        initial_cluster: parse_initial_cluster(
            &args.initial_cluster,
            &args.name,
            &args.initial_advertise_peer_urls,
        )?,
        snapshot: args.snapshot,
        data_dir: args.data_dir,
        name: args.name,
        initial_cluster_token: args.initial_cluster_token,
        advertise_peer_urls: args.initial_advertise_peer_urls,
        replace_into: args.replace_into,
    };
    let restored = consensus_node::restore::restore(&config)?;
    println!(
        "restored {} at revision {} into {}: member {:x} of new cluster {:x}",
        config.snapshot.display(),
        restored.revision,
        config.data_dir.display(),
        restored.member_id,
        restored.cluster_id
    );
    Ok(())
}

impl RunArgs {
    fn into_config(self) -> anyhow::Result<MemberConfig> {
        if self.heartbeat_interval == 0 || self.election_timeout < 5 * self.heartbeat_interval {
            bail!("--election-timeout must be at least 5 times --heartbeat-interval (etcd's rule)");
        }
        let initial_cluster =
            parse_initial_cluster(&self.initial_cluster, &self.name, &self.initial_advertise_peer_urls)?;
        Ok(MemberConfig {
            listen_client: sockets(&self.listen_client_urls)?,
            listen_peer: sockets(&self.listen_peer_urls)?,
            listen_metrics: sockets(&self.listen_metrics_urls)?,
            name: self.name,
            data_dir: self.data_dir,
            advertise_client_urls: self.advertise_client_urls,
            advertise_peer_urls: self.initial_advertise_peer_urls,
            initial_cluster,
            initial_cluster_state: self.initial_cluster_state,
            initial_cluster_token: self.initial_cluster_token,
            heartbeat_interval: Duration::from_millis(self.heartbeat_interval),
            election_timeout: Duration::from_millis(self.election_timeout),
            snapshot_count: self.snapshot_count,
            snapshot_catchup_entries: self.snapshot_catchup_entries,
            snapshot_bytes: self.snapshot_bytes,
            wal_held_bytes: self.wal_held_bytes,
            store_cache_bytes: self.store_cache_bytes,
            watch_progress_notify_interval: self.experimental_watch_progress_notify_interval,
            quota_backend_bytes: match self.quota_backend_bytes {
                0 => consensus_node::api::quota::DEFAULT_QUOTA_BYTES,
                bytes => bytes,
            },
        })
    }
}

/// Kubernetes' default `terminationMessagePath`: what is written there becomes the pod's
/// last termination message.
const TERMINATION_LOG: &str = "/dev/termination-log";

/// Exits with `LOST_DATA_EXIT_CODE`, leaving the reason where Kubernetes shows it.
fn exit_lost_data(lost: &LostVoterData) -> ! {
    tracing::error!("{lost}");
    // Only where Kubernetes provides the file: anywhere else nothing is written.
    if std::path::Path::new(TERMINATION_LOG).exists() {
        let _ = std::fs::write(TERMINATION_LOG, lost.to_string());
    }
    std::process::exit(LOST_DATA_EXIT_CODE)
}

/// Resolves on SIGTERM or Ctrl-C.
async fn termination() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn dev_cluster(args: DevClusterArgs) -> anyhow::Result<()> {
    if args.members == 0 || args.members.is_multiple_of(2) {
        bail!("--members must be odd (1, 3, 5...): an even count tolerates no more failures than one fewer");
    }
    let url = |port: u16| format!("http://127.0.0.1:{port}");
    let ports = |i: usize| {
        let base = args.base_port + (i as u16) * 3;
        (base, base + 1, base + 2)
    };
    let initial_cluster: Vec<String> =
        (0..args.members).map(|i| format!("m{i}={}", url(ports(i).1))).collect();
    let exe = std::env::current_exe().context("locating consensus-node")?;
    let mut children = Vec::new();
    for i in 0..args.members {
        let (client, peer, metrics) = ports(i);
        let child = tokio::process::Command::new(&exe)
            .arg("run")
            .args(["--name", &format!("m{i}")])
            .arg("--data-dir")
            .arg(args.base_dir.join(format!("m{i}")))
            .args(["--listen-client-urls", &url(client), "--advertise-client-urls", &url(client)])
            .args(["--listen-peer-urls", &url(peer), "--initial-advertise-peer-urls", &url(peer)])
            .args(["--listen-metrics-urls", &url(metrics)])
            .args(["--initial-cluster", &initial_cluster.join(",")])
            .kill_on_drop(true)
            .spawn()
            .context("starting a member")?;
        children.push(child);
    }
    let endpoints: Vec<String> = (0..args.members).map(|i| url(ports(i).0)).collect();
    println!("endpoints: {}", endpoints.join(","));
    println!("try: etcdctl --endpoints={} put hello world", endpoints.join(","));
    termination().await;
    for child in &mut children {
        if let Some(pid) = child.id() {
            // SIGTERM first, so a leader hands over cleanly.
            let _ = std::process::Command::new("kill").arg(pid.to_string()).status();
        }
    }
    for child in &mut children {
        let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        let _ = child.kill().await;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    runtime(cli.worker_threads)?.block_on(run_command(cli.command))
}

// `disable_lifo_slot` is behind tokio's unstable flag; `.cargo/config.toml` sets it. A
// build that sets RUSTFLAGS replaces that flag, so it must add it too.
#[cfg(not(tokio_unstable))]
compile_error!("consensus-node needs `--cfg tokio_unstable` (see .cargo/config.toml)");

/// tokio's multi-threaded runtime without its LIFO slot. With it, a task woken by another
/// runs right after it on the same worker: a watch stream's response woke its HTTP/2 body
/// task, which woke the connection, which wrote that one frame before the next stream ran,
/// so 100 watchers of a put cost 100 `sendto` calls. Without it the woken tasks queue up
/// behind the others and the connection writes their frames together. Measured against
/// etcd 3.4, four runs each way (README, "Performance"): watch fan-out 0.58-0.64 to
/// 0.72-0.82 of etcd's, puts at 256 clients 0.83-0.87 to 0.95-1.03 and at 16 clients
/// 0.89-1.07 to 1.04-1.22; it costs a single client, 0.83-1.00 to 0.73-0.83, whose request
/// now hops between workers more often.
fn runtime(worker_threads: Option<NonZeroUsize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = worker_threads {
        builder.worker_threads(threads.get());
    }
    builder.enable_all().disable_lifo_slot().thread_keep_alive(BLOCKING_THREAD_KEEP_ALIVE).build()
}

/// How long an idle blocking thread (long apply batches, durable commits, snapshots) waits
/// for more work before it exits; tokio's default is 10 s. mimalloc keeps what a thread
/// freed until that thread allocates again or exits, so after `etcdctl check perf --load=l`
/// a member's RSS stayed 850-870 MB for 10 s and fell to 680-730 MB when these threads
/// exited. A busy member keeps some: batches that find the store held by a reader or a
/// durable commit apply on them. The durable commit's own thread, a second apart, may exit
/// between two and be started again, which costs a thread's start a second.
const BLOCKING_THREAD_KEEP_ALIVE: Duration = Duration::from_secs(1);

async fn run_command(command: Command) -> anyhow::Result<()> {
    let huge_pages = disable_transparent_huge_pages();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal: under a container runtime, kubectl
        // logs or a pipe they would be literal ESC bytes in every line.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Err(error) = huge_pages {
        tracing::warn!(%error, "transparent huge pages stay enabled for this process");
    }
    match command {
        Command::Run(args) => {
            let result = run(args.into_config()?, termination()).await;
            if let Some(lost) = result.as_ref().err().and_then(|e| e.downcast_ref::<LostVoterData>()) {
                exit_lost_data(lost);
            }
            result
        }
        Command::DevCluster(args) => dev_cluster(args).await,
        Command::Restore(args) => restore(args),
        Command::Backup(args) => backup(args).await,
        Command::Verify(args) => verify(args).await,
        Command::Fetch(args) => {
            let StoredBackupArgs { from, store } = args.stored;
            let name = args.name.as_deref();
            let manifest = consensus_node::backup::fetch(&from, &store.options(), name, &args.to).await?;
            println!("{}", serde_json::to_string(&manifest)?);
            Ok(())
        }
    }
}

async fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let StoredBackupArgs { from, store } = args.stored;
    let manifest =
        consensus_node::backup::verify_stored(&from, &store.options(), &args.name, &args.scratch_dir).await?;
    println!("{}", serde_json::to_string(&manifest)?);
    match manifest.verification {
        Some(why) if manifest.verified != Some(true) => {
            bail!("backup {} failed verification: {why}", args.name)
        }
        _ => Ok(()),
    }
}

async fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let config = consensus_node::backup::BackupConfig {
        endpoint: args.endpoint,
        destination: args.to,
        s3: args.store.options(),
        name: args.name,
        retention: args.retain_count.map(|max_count| consensus_node::backup::retention::Policy {
            max_count,
            max_age: args.retain_max_age_seconds.map(Duration::from_secs),
            tiered: args.retain_tiered,
        }),
        verify_in: args.verify.then_some(args.scratch_dir),
    };
    let outcome = consensus_node::backup::backup(&config).await;
    if let Some(path) = &args.report {
        let written = match &outcome {
            Ok(report) => consensus_node::backup::Outcome::Succeeded(Box::new(report.for_report_file())),
            Err(error) => consensus_node::backup::Outcome::Failed { error: format!("{error:#}") },
        };
        std::fs::write(path, serde_json::to_vec(&written)?)
            .with_context(|| format!("writing the report to {}", path.display()))?;
    }
    println!("{}", serde_json::to_string(&outcome?)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;
    use std::sync::{Arc, Barrier};
    use std::time::{Duration, Instant};

    use super::{parse_initial_cluster, runtime};

    /// The memory a blocking thread freed is handed back when the thread exits (see
    /// `BLOCKING_THREAD_KEEP_ALIVE`), so idle ones must not linger for tokio's default 10 s.
    #[test]
    fn idle_blocking_threads_exit_soon_after_their_work() {
        let runtime = runtime(Some(NonZeroUsize::MIN)).expect("runtime");
        let metrics = runtime.metrics();
        runtime.block_on(async {
            // Four tasks that wait for each other run on four threads at once.
            let together = Arc::new(Barrier::new(4));
            let tasks: Vec<_> = (0..4)
                .map(|_| {
                    let together = together.clone();
                    tokio::task::spawn_blocking(move || {
                        together.wait();
                    })
                })
                .collect();
            for task in tasks {
                task.await.expect("blocking task");
            }
        });
        assert!(metrics.num_blocking_threads() >= 4, "{} blocking threads", metrics.num_blocking_threads());
        // Half tokio's default keep-alive.
        let deadline = Instant::now() + Duration::from_secs(5);
        while metrics.num_blocking_threads() > 0 {
            assert!(
                Instant::now() < deadline,
                "{} idle blocking threads are still alive",
                metrics.num_blocking_threads()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process's memory, resident now.
    fn resident_bytes() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS");
        kib << 10
    }

    /// What a thread freed goes back to the system when the thread releases it, not only when
    /// the thread exits (mimalloc keeps it until then): see `allocator::release_freed`.
    #[test]
    fn memory_a_thread_freed_goes_back_to_the_system_when_it_releases_it() {
        let (held, released) = std::thread::spawn(|| {
            // 128 MiB in blocks of a request's size (mimalloc's, not the store's pages), freed.
            let blocks: Vec<Vec<u8>> = (0..32 * 1024).map(|_| vec![1u8; 4000]).collect();
            drop(blocks);
            let held = resident_bytes();
            consensus_node::allocator::release_freed();
            (held, resident_bytes())
        })
        .join()
        .expect("thread");
        assert!(
            held.saturating_sub(released) >= 64 << 20,
            "resident {} MiB after freeing, {} MiB after releasing",
            held >> 20,
            released >> 20
        );
    }

    #[test]
    fn an_empty_initial_cluster_entry_is_this_member_alone_and_a_bad_one_is_refused() {
        let own = ["http://10.0.0.1:2380".to_owned()];
        let alone = vec![("demo-0".to_owned(), own[0].clone())];
        // As a ConfigMap of a workload without members yet has it: `--initial-cluster=`.
        assert_eq!(parse_initial_cluster(&[String::new()], "demo-0", &own).expect("parses"), alone);
        assert_eq!(parse_initial_cluster(&[], "demo-0", &own).expect("parses"), alone);
        let two = ["a=http://a:2380".to_owned(), "b=http://b:2380".to_owned()];
        assert_eq!(parse_initial_cluster(&two, "a", &own).expect("parses").len(), 2);
        let bad = parse_initial_cluster(&["a".to_owned()], "a", &own).expect_err("refused");
        assert!(bad.to_string().contains("is not name=peer-url"), "{bad}");
    }
}
