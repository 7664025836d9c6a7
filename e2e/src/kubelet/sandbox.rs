//! The pod sandbox: a network namespace with a veth on the host bridge and the pod's address
//! (no default route: nothing leaves the machine), plus its /etc/hosts and /etc/resolv.conf.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};
use tokio::process::Command;

/// `ccpod-<first 12 chars of the uid>` (the contract's name).
pub fn netns_name(uid: &str) -> String {
    format!("ccpod-{}", uid.chars().take(12).collect::<String>())
}

/// `cv<8 hex chars of the uid>`: the host end of the pod's veth.
pub fn veth_name(uid: &str) -> String {
    let hex: String = uid.chars().filter(|c| c.is_ascii_hexdigit()).take(8).collect();
    format!("cv{hex}")
}

pub fn netns_path(uid: &str) -> String {
    format!("/run/netns/{}", netns_name(uid))
}

/// Picks the pod address in 10.244.<node>.0/24: the first free one at or after `cursor`
/// (wrapping), so an address just released is the last to be handed out again.
pub fn allocate(node_number: u8, used: &BTreeMap<String, Ipv4Addr>, cursor: u8) -> Option<Ipv4Addr> {
    let start = cursor.clamp(2, 254);
    (start..=254)
        .chain(2..start)
        .map(|last| Ipv4Addr::new(10, 244, node_number, last))
        .find(|ip| !used.values().any(|u| u == ip))
}

async fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().await.context("running ip")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Creates (afresh) the namespace and veth for `uid` with `addr`/16 on eth0.
pub async fn create(uid: &str, addr: Ipv4Addr, bridge: &str) -> Result<()> {
    let ns = netns_name(uid);
    let veth = veth_name(uid);
    // Leftovers of an earlier attempt would make every step below fail.
    destroy(uid).await;
    ip(&["netns", "add", &ns]).await?;
    ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns]).await?;
    ip(&["link", "set", &veth, "master", bridge]).await?;
    ip(&["link", "set", &veth, "up"]).await?;
    ip(&["-n", &ns, "link", "set", "lo", "up"]).await?;
    ip(&["-n", &ns, "addr", "add", &format!("{addr}/16"), "dev", "eth0"]).await?;
    ip(&["-n", &ns, "link", "set", "eth0", "up"]).await?;
    Ok(())
}

/// Whether the namespace of `uid` is there.
pub fn exists(uid: &str) -> bool {
    std::path::Path::new(&netns_path(uid)).exists()
}

/// Removes the veth and the namespace; missing pieces are fine.
pub async fn destroy(uid: &str) {
    let _ = ip(&["link", "del", &veth_name(uid)]).await;
    let _ = ip(&["netns", "del", &netns_name(uid)]).await;
}

/// /etc/hosts of a pod, as the kubelet writes it.
pub fn hosts_file(
    pod_ip: &str,
    hostname: &str,
    subdomain: Option<&str>,
    namespace: &str,
    domain: &str,
    aliases: &[(String, Vec<String>)],
) -> String {
    let mut s = String::from(
        "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
    );
    match subdomain {
        Some(sub) if !sub.is_empty() => {
            s.push_str(&format!("{pod_ip}\t{hostname}.{sub}.{namespace}.svc.{domain}\t{hostname}\n"))
        }
        _ => s.push_str(&format!("{pod_ip}\t{hostname}\n")),
    }
    if !aliases.is_empty() {
        s.push_str("\n# Entries added by HostAliases.\n");
        for (ip, names) in aliases {
            s.push_str(&format!("{ip}\t{}\n", names.join("\t")));
        }
    }
    s
}

/// /etc/resolv.conf for ClusterFirst DNS; `dns_config` entries are appended (searches, options).
pub fn resolv_conf(
    nameserver: &str,
    namespace: &str,
    domain: &str,
    extra_search: &[String],
    extra_options: &[String],
) -> String {
    let mut search = vec![format!("{namespace}.svc.{domain}"), format!("svc.{domain}"), domain.to_owned()];
    search.extend(extra_search.iter().cloned());
    let mut options = vec!["ndots:5".to_owned()];
    for o in extra_options {
        let key = o.split(':').next().unwrap_or_default();
        options.retain(|x| x.split(':').next() != Some(key));
        options.push(o.clone());
    }
    format!("search {}\nnameserver {nameserver}\noptions {}\n", search.join(" "), options.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        let uid = "3f2a9c1e-5b2d-4c1a-9e8f-0123456789ab";
        assert_eq!(netns_name(uid), "ccpod-3f2a9c1e-5b2");
        assert_eq!(veth_name(uid), "cv3f2a9c1e");
        assert!(veth_name(uid).len() <= 15, "interface names are at most 15 bytes");
    }

    #[test]
    fn allocation_skips_used_addresses_and_wraps() {
        let mut used = BTreeMap::new();
        assert_eq!(allocate(3, &used, 2), Some(Ipv4Addr::new(10, 244, 3, 2)));
        used.insert("a".into(), Ipv4Addr::new(10, 244, 3, 2));
        assert_eq!(allocate(3, &used, 2), Some(Ipv4Addr::new(10, 244, 3, 3)));
        // The cursor sits past an address just released: it is not handed out at once.
        assert_eq!(allocate(3, &used, 10), Some(Ipv4Addr::new(10, 244, 3, 10)));
        used.insert("b".into(), Ipv4Addr::new(10, 244, 3, 254));
        assert_eq!(allocate(3, &used, 254), Some(Ipv4Addr::new(10, 244, 3, 3)));
        let full: BTreeMap<String, Ipv4Addr> =
            (2..=254).map(|i| (i.to_string(), Ipv4Addr::new(10, 244, 3, i))).collect();
        assert_eq!(allocate(3, &full, 2), None);
    }

    #[test]
    fn hosts_and_resolv_conf() {
        let h = hosts_file("10.244.1.7", "m-0", Some("peers"), "ns1", "cluster.local", &[]);
        assert!(h.contains("10.244.1.7\tm-0.peers.ns1.svc.cluster.local\tm-0\n"));
        assert!(h.contains("127.0.0.1\tlocalhost"));
        let aliases = [("10.244.0.1".to_owned(), vec!["api".to_owned(), "api.local".to_owned()])];
        let h = hosts_file("10.244.1.7", "m-0", None, "ns1", "cluster.local", &aliases);
        assert!(h.contains("10.244.1.7\tm-0\n"));
        assert!(h.ends_with("10.244.0.1\tapi\tapi.local\n"));
        let r =
            resolv_conf("10.244.0.1", "ns1", "cluster.local", &[], &["ndots:2".into(), "timeout:1".into()]);
        assert_eq!(
            r,
            "search ns1.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.244.0.1\noptions ndots:2 timeout:1\n"
        );
    }
}
