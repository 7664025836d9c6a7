//! `consensus-node restore`: a member's data directory built from a snapshot file, as the
//! first state of a new cluster (etcd's `etcdctl snapshot restore`).
//!
//! The new cluster starts where the snapshot ends, without a log: every member's store
//! holds the snapshot's keys, applied up to one synthetic log id that every member derives
//! from the same flags, with the new members as voters as of that log id; the Raft log
//! counts everything up to it as purged, and a Raft snapshot for it sits in the snapshot
//! directory. A member started on such a directory finds its identity (so it does not
//! bootstrap), elects a leader with the others, and a member added later is sent the
//! snapshot, as the log before it never existed.
//!
//! The synthetic log id has term 0, as the entry `Raft::initialize` writes: every elected
//! leader's term is at least 1, so every later entry orders after it. (A term-1 id naming
//! one member as its leader would order after the entries of another member elected in
//! term 1 with a smaller id, as openraft orders leader ids by term, then node id.)

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use openraft::vote::RaftLeaderId;

use crate::kv::MvccStore;
use crate::member::{Identity, cluster_id_for};
use crate::raft::log_store::LogStore;
use crate::raft::state_machine::{open_snapshot, seed_new_cluster};
use crate::raft::types::{LogId, Member, Membership, TypeConfig};
use crate::server::{Layout, initial_members, own_initial_id};
use crate::storage::hard_state::sync_dir;

/// What `restore` needs: the snapshot and the same bootstrap flags `run` gets.
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    pub snapshot: PathBuf,
    pub data_dir: PathBuf,
    pub name: String,
    /// `name=peer-url` pairs of the new cluster's members.
    pub initial_cluster: Vec<(String, String)>,
    pub initial_cluster_token: String,
    pub advertise_peer_urls: Vec<String>,
    /// Replacing a member: its data directory, if it holds anything, is moved into this
    /// directory first (never deleted), and a data directory this same restore made
    /// already is kept as it is, so the restore can be run again until it has succeeded
    /// once (the operator's recovery Job does). Without it the data directory must be empty.
    pub replace_into: Option<PathBuf>,
}

/// What a restore made, for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub member_id: u64,
    pub cluster_id: u64,
    /// The store revision the snapshot holds.
    pub revision: i64,
}

/// The log id the restored state counts as applied: the same on every member restored with
/// the same `--initial-cluster` and token (see the module comment for why term 0).
fn restore_point(members: &BTreeMap<u64, Member>) -> anyhow::Result<LogId> {
    let first = *members.keys().next().context("--initial-cluster names no member")?;
    let leader = <openraft::type_config::alias::LeaderIdOf<TypeConfig> as RaftLeaderId>::new(0, first);
    Ok(LogId::new(leader.to_committed(), 1))
}

fn is_empty_or_absent(dir: &Path) -> anyhow::Result<bool> {
    match fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
    }
}

/// Builds the data directory. Checks everything it can before creating anything, builds
/// in a sibling directory and renames it into place at the end, so a failure leaves no
/// partial data directory behind.
pub fn restore(config: &RestoreConfig) -> anyhow::Result<Restored> {
    let members = initial_members(&config.initial_cluster, &config.initial_cluster_token);
    let member_id =
        own_initial_id(&members, &config.name, &config.advertise_peer_urls, &config.initial_cluster_token)?;
    let ids: Vec<u64> = members.keys().copied().collect();
    let cluster_id = cluster_id_for(&ids, &config.initial_cluster_token);
    let identity = Identity { name: config.name.clone(), member_id, cluster_id, founding: None };
    if config.replace_into.is_some()
        && let Some(revision) = made_already(&config.data_dir, &identity)?
    {
        return Ok(Restored { member_id, cluster_id, revision });
    }
    open_snapshot(&config.snapshot)
        .with_context(|| format!("refusing snapshot {}", config.snapshot.display()))?;
    if let Some(keep) = &config.replace_into {
        set_aside(&config.data_dir, keep)?;
    }
    if !is_empty_or_absent(&config.data_dir)? {
        bail!(
            "data directory {} is not empty: restore creates a new member and never overwrites one",
            config.data_dir.display()
        );
    }
    let file_name = config
        .data_dir
        .file_name()
        .with_context(|| format!("--data-dir {} names no directory", config.data_dir.display()))?;
    let staging = config.data_dir.with_file_name(format!(".{}.restoring", file_name.to_string_lossy()));
    if staging.exists() && config.replace_into.is_some() {
        // Left by a try of this same replacement that was interrupted: nothing in it counts.
        fs::remove_dir_all(&staging).with_context(|| format!("removing {}", staging.display()))?;
    }
    if staging.exists() {
        bail!(
            "{} exists, left by an interrupted restore; remove it and run restore again",
            staging.display()
        );
    }
    let built = build(config, &staging, &identity, members).and_then(|revision| {
        // Renaming onto an empty directory replaces it, so an empty --data-dir made in
        // advance (a volume mount point's subdirectory, say) is fine.
        fs::rename(&staging, &config.data_dir)
            .with_context(|| format!("moving {} to {}", staging.display(), config.data_dir.display()))?;
        let parent = config.data_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        sync_dir(parent)?;
        Ok(revision)
    });
    match built {
        Ok(revision) => Ok(Restored { member_id, cluster_id, revision }),
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

/// The revision of the member `identity` names when `data_dir` holds it already (an earlier
/// run of the same restore, and whatever it has served since).
fn made_already(data_dir: &Path, identity: &Identity) -> anyhow::Result<Option<i64>> {
    let layout = Layout::new(data_dir);
    match Identity::load(&layout.member) {
        // Who the member is, not how it was founded: a founder's identity keeps its founding
        // members until a later start.
        Ok(Some(found))
            if (&found.name, found.member_id, found.cluster_id)
                == (&identity.name, identity.member_id, identity.cluster_id) =>
        {
            let store = MvccStore::open(&layout.store())?;
            Ok(Some(store.read()?.revision()?))
        }
        // Another member's data, none, or data damaged past reading its identity (likely
        // enough after a disaster): replaced, kept aside as it is.
        Ok(_) | Err(_) => Ok(None),
    }
}

/// Moves a non-empty `data_dir` into `keep`, under its own name or, taken by an earlier
/// replacement, the first free `<name>.<n>`.
fn set_aside(data_dir: &Path, keep: &Path) -> anyhow::Result<()> {
    if is_empty_or_absent(data_dir)? {
        return Ok(());
    }
    let name = data_dir.file_name().with_context(|| format!("{} names no directory", data_dir.display()))?;
    fs::create_dir_all(keep).with_context(|| format!("creating {}", keep.display()))?;
    let mut to = keep.join(name);
    for n in 1.. {
        if !to.exists() {
            break;
        }
        to = keep.join(format!("{}.{n}", name.to_string_lossy()));
    }
    fs::rename(data_dir, &to)
        .with_context(|| format!("moving {} to {}", data_dir.display(), to.display()))?;
    sync_dir(keep)?;
    let parent = data_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    sync_dir(parent)?;
    Ok(())
}

fn build(
    config: &RestoreConfig,
    dir: &Path,
    identity: &Identity,
    members: BTreeMap<u64, Member>,
) -> anyhow::Result<i64> {
    let layout = Layout::new(dir);
    fs::create_dir_all(&layout.member).with_context(|| format!("creating {}", layout.member.display()))?;
    let log_id = restore_point(&members)?;
    let revision = {
        let store = MvccStore::open(&layout.store())?;
        seed_new_cluster(&store, &config.snapshot, log_id, Membership::from(members), &layout.snapshots())
            .with_context(|| format!("restoring {}", config.snapshot.display()))?;
        store.read()?.revision()?
    };
    LogStore::create_after_snapshot(&layout.raft_log(), log_id)?;
    // Written last: `run` takes a directory with an identity for a complete member.
    identity.save(&layout.member)?;
    sync_dir(&layout.member)?;
    sync_dir(dir)?;
    Ok(revision)
}
