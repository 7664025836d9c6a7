//! Faults on the peer links: every member's advertised peer URL is a proxy in front of its
//! real peer port, so partitions and delays between members need neither namespaces nor
//! root. A proxy learns which member dialed it from the connection's two ends (the dialing
//! socket's inode in `/proc/net/tcp`, found among the members' open files), so a partition
//! cuts both directions between two members while clients still reach each of them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The state of every peer link: pairs cut off from each other, and delays per member.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Links {
    /// Unordered pairs (lower index first).
    pub cut: BTreeSet<(usize, usize)>,
    /// Every byte to or from this member on a peer link waits this long.
    pub delayed: BTreeMap<usize, Duration>,
}

impl Links {
    pub fn is_cut(&self, a: usize, b: usize) -> bool {
        self.cut.contains(&(a.min(b), a.max(b)))
    }

    pub fn delay(&self, a: usize, b: usize) -> Duration {
        let of = |m| self.delayed.get(&m).copied().unwrap_or_default();
        of(a).max(of(b))
    }

    /// `member` cut off from every other of `size`.
    pub fn isolate(&mut self, member: usize, size: usize) {
        for other in (0..size).filter(|o| *o != member) {
            self.cut.insert((member.min(other), member.max(other)));
        }
    }
}

/// What the proxies share: the link state, and the members' PIDs to tell who dialed.
#[derive(Clone)]
pub struct Network {
    links: Arc<watch::Sender<Links>>,
    pids: Arc<Mutex<Vec<Option<u32>>>>,
    /// Peer connections accepted, and of those the ones whose dialer was no member.
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    unknown: Arc<std::sync::atomic::AtomicUsize>,
}

impl Network {
    pub fn new(size: usize) -> Self {
        Self {
            links: Arc::new(watch::Sender::new(Links::default())),
            pids: Arc::new(Mutex::new(vec![None; size])),
            accepted: Arc::default(),
            unknown: Arc::default(),
        }
    }

    pub fn set_pid(&self, member: usize, pid: Option<u32>) {
        self.pids.lock().unwrap_or_else(|p| p.into_inner())[member] = pid;
    }

    pub fn change(&self, change: impl FnOnce(&mut Links)) {
        self.links.send_modify(change);
    }

    pub fn heal(&self) {
        self.links.send_replace(Links::default());
    }

    /// Peer connections accepted so far, and how many of them no member was found to dial
    /// (those are never faulted; a joiner's first question is one).
    pub fn connections(&self) -> (usize, usize) {
        let load = |n: &std::sync::atomic::AtomicUsize| n.load(std::sync::atomic::Ordering::Relaxed);
        (load(&self.accepted), load(&self.unknown))
    }

    /// Serves member `target`'s advertised peer port on `listener`, forwarding to `real`.
    pub fn serve(&self, listener: TcpListener, target: usize, real: u16) {
        let network = self.clone();
        tokio::spawn(async move {
            let Ok(own) = listener.local_addr() else { return };
            while let Ok((inbound, from)) = listener.accept().await {
                let source = network.member_dialing(from.port(), own.port());
                network.accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if source.is_none() {
                    network.unknown.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let network = network.clone();
                tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(("127.0.0.1", real)).await {
                        network.relay(inbound, outbound, source, target).await;
                    }
                });
            }
        });
    }

    /// The member owning the loopback socket from `port` to `to_port`.
    fn member_dialing(&self, port: u16, to_port: u16) -> Option<usize> {
        let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
        let inode = socket_inode(&table, port, to_port)?;
        let pids = self.pids.lock().unwrap_or_else(|p| p.into_inner()).clone();
        pids.iter().position(|pid| pid.is_some_and(|pid| owns_socket(pid, inode)))
    }

    /// Copies both ways until either side closes or the link between `source` and `target`
    /// is cut; each chunk waits out the link's delay.
    async fn relay(&self, inbound: TcpStream, outbound: TcpStream, source: Option<usize>, target: usize) {
        let Some(source) = source else {
            // Not a member (a joiner asking for its id before its PID is known): never faulted.
            let (mut a, mut b) = (inbound, outbound);
            let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
            return;
        };
        let mut links = self.links.subscribe();
        if links.borrow().is_cut(source, target) {
            return;
        }
        let (mut in_read, mut in_write) = inbound.into_split();
        let (mut out_read, mut out_write) = outbound.into_split();
        let forward = pipe(&mut in_read, &mut out_write, self.links.subscribe(), source, target);
        let backward = pipe(&mut out_read, &mut in_write, self.links.subscribe(), source, target);
        let cut = async {
            let _ = links.wait_for(|l| l.is_cut(source, target)).await;
        };
        tokio::select! {
            _ = forward => {}
            _ = backward => {}
            _ = cut => {}
        }
    }
}

async fn pipe(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    links: watch::Receiver<Links>,
    a: usize,
    b: usize,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let delay = links.borrow().delay(a, b);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// The inode of the open socket from `port` to `to_port` in `table` (`/proc/net/tcp`). The
/// whole connection is matched: a local port alone may also be a socket in TIME_WAIT (inode
/// 0) or one to another destination, which would leave the link unfaulted or blame another
/// member.
fn socket_inode(table: &str, port: u16, to_port: u16) -> Option<u64> {
    let (local, remote) = (format!(":{port:04X}"), format!(":{to_port:04X}"));
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let ends = fields.get(1)?.ends_with(&local) && fields.get(2)?.ends_with(&remote);
        ends.then(|| fields.get(9)?.parse().ok().filter(|inode| *inode != 0))?
    })
}

fn owns_socket(pid: u32, inode: u64) -> bool {
    let wanted = format!("socket:[{inode}]");
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target.as_os_str() == wanted.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolating_a_member_cuts_it_from_every_other_and_only_from_them() {
        let mut links = Links::default();
        links.isolate(1, 3);
        assert!(links.is_cut(0, 1) && links.is_cut(1, 0) && links.is_cut(2, 1));
        assert!(!links.is_cut(0, 2));
        links.delayed.insert(2, Duration::from_millis(40));
        assert_eq!(links.delay(0, 2), Duration::from_millis(40));
        assert_eq!(links.delay(0, 1), Duration::ZERO);
    }

    #[tokio::test]
    async fn a_proxy_tells_which_process_dialed_it() {
        // This test process is "member 0"; its own connection is found by its source port.
        let network = Network::new(1);
        network.set_pid(0, Some(std::process::id()));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let client = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
        let (_server, from) = listener.accept().await.expect("accept");
        assert_eq!(from.port(), client.local_addr().expect("addr").port());
        assert_eq!(network.member_dialing(from.port(), port), Some(0));
        assert_eq!(network.member_dialing(from.port(), port.wrapping_add(1)), None);
    }

    #[test]
    fn the_dialing_socket_is_matched_by_both_ends() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:4E21 0100007F:4E22 06 00000000:00000000 03:00000A1B 00000000     0        0 0 3 0000000000000000
   1: 0100007F:4E21 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 111 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:4E21 0100007F:4E22 01 00000000:00000000 00:00000000 00000000     0        0 222 1 0000000000000000 20 4 30 10 -1
";
        // Port 0x4E21 also has a TIME_WAIT socket (inode 0) and one to port 8080 listed first.
        assert_eq!(socket_inode(table, 0x4E21, 0x4E22), Some(222));
        assert_eq!(socket_inode(table, 0x4E21, 0x1F90), Some(111));
        assert_eq!(socket_inode(table, 0x4E21, 0x4E23), None);
    }
}
