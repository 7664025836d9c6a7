//! Instructions per put in `make bench` (valgrind's callgrind; `perf stat` cannot count
//! instructions on these machines): a fresh 3-member cluster of each system with every member
//! under callgrind, `PUTS` puts of 256 bytes from 1 client to the leader, the instructions
//! the three members executed meanwhile, summed, less what they execute idle over as long.
//! Counts do not depend on how busy the machine is, so this figure is steadier than CPU time.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tonic::transport::Endpoint;

use super::{Cluster, KvClient, PutRequest, System, VALUE_BYTES, print_figure};

const PUTS: usize = 200;
/// Puts before counting: the client's connection, the first allocations, the first entries.
const WARM_UP: usize = 20;
/// Under callgrind a member runs tens of times slower than natively: heartbeats and
/// elections are spaced, the same for every system, so that the leader stays.
const TIMEOUTS: [&str; 4] = ["--heartbeat-interval", "500", "--election-timeout", "5000"];

/// Measures every system in turn and prints instructions per put, ours first.
pub async fn measure(etcds: &[System], dir: &Path) -> anyhow::Result<()> {
    let ours = per_put(&System::Ours, &dir.join("ours")).await?;
    let mut theirs = Vec::new();
    for (i, etcd) in etcds.iter().enumerate() {
        theirs.push((etcd.name(), per_put(etcd, &dir.join(format!("etcd-{i}"))).await?));
    }
    println!(
        "instructions per put (thousands), summed over the 3 members: callgrind, {PUTS} puts at 1 client \
         to the leader, idle subtracted"
    );
    print_figure(
        "instructions per put (k)",
        ours / 1000.0,
        &theirs.into_iter().map(|(n, i)| (n, i / 1000.0)).collect::<Vec<_>>(),
    );
    println!();
    Ok(())
}

async fn per_put(system: &System, dir: &Path) -> anyhow::Result<f64> {
    let out = dir.join("callgrind");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let wrapper = [
        "env".to_owned(),
        // Go's asynchronous preemption signals trip an assertion in callgrind's signal
        // handling; the Go runtime then preempts at function calls only. `env` and
        // Debian's `valgrind` script both exec, so a member's pid is callgrind's.
        "GODEBUG=asyncpreemptoff=1".to_owned(),
        "valgrind".to_owned(),
        "--tool=callgrind".to_owned(),
        format!("--callgrind-out-file={}/callgrind.%p", out.display()),
    ];
    let cluster = Cluster::start_under(system.clone(), &dir.join("members"), &TIMEOUTS, &wrapper)?;
    let leader = cluster.leader_answering_within(Duration::from_secs(300), Duration::from_secs(30)).await?;
    let mut kv = KvClient::new(
        Endpoint::from_shared(cluster.members[leader].client_url.clone())?
            .timeout(Duration::from_secs(60))
            .connect_lazy(),
    );
    for i in 0..WARM_UP {
        put(&mut kv, i).await?;
    }
    let pids = cluster
        .members
        .iter()
        .map(|m| m.pid())
        .collect::<Option<Vec<_>>>()
        .with_context(|| format!("{}: a member is not running", system.name()))?;
    control(&pids, "--zero")?;
    let started = Instant::now();
    for i in WARM_UP..WARM_UP + PUTS {
        put(&mut kv, i).await?;
    }
    let busy_for = started.elapsed();
    control(&pids, "--dump")?;
    let busy = dumped(&out, &pids, 1)?;
    // What the members execute with nothing to do (heartbeats, timers), over as long.
    control(&pids, "--zero")?;
    tokio::time::sleep(busy_for).await;
    control(&pids, "--dump")?;
    let idle = dumped(&out, &pids, 2)?;
    Ok(busy.saturating_sub(idle) as f64 / PUTS as f64)
}

async fn put(kv: &mut KvClient<tonic::transport::Channel>, i: usize) -> anyhow::Result<()> {
    let request = PutRequest {
        key: format!("bench/instructions/{i:05}").into_bytes(),
        value: vec![b'i'; VALUE_BYTES],
        ..PutRequest::default()
    };
    kv.put(request).await?;
    Ok(())
}

/// Runs `callgrind_control <action>` on each member; it returns once the member has done it.
fn control(pids: &[u32], action: &str) -> anyhow::Result<()> {
    for pid in pids {
        let output = Command::new("callgrind_control")
            .args([action, &pid.to_string()])
            .output()
            .context("running callgrind_control (Debian's valgrind)")?;
        if !output.status.success() {
            bail!("callgrind_control {action} {pid}: {}", String::from_utf8_lossy(&output.stderr));
        }
    }
    Ok(())
}

/// The instructions in the members' `nth` dumps, summed.
fn dumped(out: &Path, pids: &[u32], nth: usize) -> anyhow::Result<u64> {
    let mut total = 0;
    for pid in pids {
        let path = out.join(format!("callgrind.{pid}.{nth}"));
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        total += text
            .lines()
            .find_map(|l| l.strip_prefix("totals:")?.trim().parse::<u64>().ok())
            .with_context(|| format!("{} has no totals line", path.display()))?;
    }
    Ok(total)
}
