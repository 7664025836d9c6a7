//! Txn, Compact and leases through Debian's etcdctl (3.4) against a 3-member cluster.

mod support;

use support::*;

/// The hex lease id etcdctl prints in `lease <id> granted with TTL(..)`.
fn granted_lease(output: &str) -> String {
    output.split_whitespace().nth(1).expect("lease grant prints the id").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_runs_the_branch_its_compares_choose() {
    let cluster = TestCluster::start(3);
    cluster.leader().await;
    let endpoints = cluster.endpoints();
    ok(cluster.etcdctl(&endpoints, &["put", "config/mode", "blue"]));

    // Non-interactive txn from stdin: compares, success ops, failure ops, each ending in
    // an empty line.
    let swap = "value(\"config/mode\") = \"blue\"\n\nput config/mode green\nget config/mode\n\nput config/failed yes\n\n";
    let out = ok(etcdctl(&endpoints, &["txn"], Some(swap)));
    assert!(out.starts_with("SUCCESS"), "{out}");
    assert!(out.contains("config/mode\ngreen"), "the get sees the put before it: {out}");
    let again = ok(etcdctl(&endpoints, &["txn"], Some(swap)));
    assert!(again.starts_with("FAILURE"), "{again}");
    // Interactive mode prompts for each part and reads the same input.
    let interactive = ok(etcdctl(&endpoints, &["txn", "--interactive"], Some(swap)));
    assert!(interactive.contains("compares:") && interactive.contains("FAILURE"), "{interactive}");
    assert_eq!(
        ok(cluster.etcdctl(&endpoints, &["get", "config/failed", "--print-value-only"])).trim(),
        "yes"
    );

    // Compares on create revision, version and mod revision: "create if absent".
    let create = "create(\"lock/owner\") = \"0\"\n\nput lock/owner me\n\nget lock/owner\n\n";
    assert!(ok(etcdctl(&endpoints, &["txn"], Some(create))).starts_with("SUCCESS"));
    let second = ok(etcdctl(&endpoints, &["txn"], Some(create)));
    assert!(second.starts_with("FAILURE") && second.contains("lock/owner\nme"), "{second}");
    let version = "version(\"lock/owner\") = \"1\"\nmod(\"lock/owner\") > \"1\"\n\ndel lock/owner\n\n\n";
    assert!(ok(etcdctl(&endpoints, &["txn"], Some(version))).starts_with("SUCCESS"));
    assert_eq!(ok(cluster.etcdctl(&endpoints, &["get", "lock/owner"])).trim(), "");

    // One revision for every write of a txn.
    let before: serde_json::Value =
        serde_json::from_str(&ok(cluster.etcdctl(&endpoints, &["get", "x", "-w", "json"]))).expect("json");
    let both = "\nput t/a 1\nput t/b 2\n\n\n";
    ok(etcdctl(&endpoints, &["txn"], Some(both)));
    let after: serde_json::Value =
        serde_json::from_str(&ok(cluster.etcdctl(&endpoints, &["get", "t/", "--prefix", "-w", "json"])))
            .expect("json");
    let revision = before["header"]["revision"].as_i64().expect("revision") + 1;
    assert_eq!(after["kvs"][0]["mod_revision"], revision);
    assert_eq!(after["kvs"][1]["mod_revision"], revision);

    // A key written twice in one branch is refused, and nothing is written.
    let twice = "\nput t/c 1\nput t/c 2\n\n\n";
    assert!(
        failed(etcdctl(&endpoints, &["txn"], Some(twice))).contains("duplicate key given in txn request")
    );
    assert_eq!(ok(cluster.etcdctl(&endpoints, &["get", "t/c"])).trim(), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_forgets_old_revisions_but_keeps_the_newest() {
    let cluster = TestCluster::start(3);
    cluster.leader().await;
    let endpoints = cluster.endpoints();
    let revision = |output: String| -> i64 {
        let json: serde_json::Value = serde_json::from_str(&output).expect("json");
        json["header"]["revision"].as_i64().expect("revision")
    };
    let first = revision(ok(cluster.etcdctl(&endpoints, &["put", "k", "v1", "-w", "json"])));
    let second = revision(ok(cluster.etcdctl(&endpoints, &["put", "k", "v2", "-w", "json"])));
    ok(cluster.etcdctl(&endpoints, &["put", "gone", "x"]));
    ok(cluster.etcdctl(&endpoints, &["del", "gone"]));
    let third = revision(ok(cluster.etcdctl(&endpoints, &["put", "k", "v3", "-w", "json"])));

    assert_eq!(
        ok(cluster.etcdctl(&endpoints, &["compact", &second.to_string()])).trim(),
        format!("compacted revision {second}")
    );
    let compacted = failed(cluster.etcdctl(&endpoints, &["get", "k", &format!("--rev={first}")]));
    assert!(compacted.contains("required revision has been compacted"), "{compacted}");
    // Every member keeps the version current at the compacted revision.
    for member in &cluster.members {
        let endpoint = member.endpoint();
        let at_second = ok(cluster.etcdctl(
            &endpoint,
            &["get", "k", &format!("--rev={second}"), "--print-value-only", "--consistency=s"],
        ));
        assert_eq!(at_second.trim(), "v2");
        let at_third =
            ok(cluster.etcdctl(&endpoint, &["get", "k", &format!("--rev={third}"), "--print-value-only"]));
        assert_eq!(at_third.trim(), "v3");
    }
    let again = failed(cluster.etcdctl(&endpoints, &["compact", &first.to_string()]));
    assert!(again.contains("required revision has been compacted"), "{again}");
    let future = failed(cluster.etcdctl(&endpoints, &["compact", "100000"]));
    assert!(future.contains("required revision is a future revision"), "{future}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_keep_keys_alive_until_revoked_or_expired() {
    let cluster = TestCluster::start(3);
    cluster.leader().await;
    let endpoints = cluster.endpoints();

    let lease = granted_lease(&ok(cluster.etcdctl(&endpoints, &["lease", "grant", "60"])));
    ok(cluster.etcdctl(&endpoints, &["put", "session/a", "1", &format!("--lease={lease}")]));
    ok(cluster.etcdctl(&endpoints, &["put", "session/b", "2", &format!("--lease={lease}")]));
    let ttl = ok(cluster.etcdctl(&endpoints, &["lease", "timetolive", &lease, "--keys"]));
    assert!(
        ttl.contains("granted with TTL(60s)") && ttl.contains("session/a") && ttl.contains("session/b"),
        "{ttl}"
    );
    let kept = ok(cluster.etcdctl(&endpoints, &["lease", "keep-alive", "--once", &lease]));
    assert!(kept.contains("keepalived with TTL(60)"), "{kept}");
    assert!(ok(cluster.etcdctl(&endpoints, &["lease", "list"])).contains(&lease));
    assert!(ok(cluster.etcdctl(&endpoints, &["lease", "revoke", &lease])).contains("revoked"));
    assert_eq!(ok(cluster.etcdctl(&endpoints, &["get", "session/", "--prefix"])).trim(), "");
    let gone = ok(cluster.etcdctl(&endpoints, &["lease", "timetolive", &lease]));
    assert!(gone.contains("already expired"), "{gone}");
    let revoked_again = failed(cluster.etcdctl(&endpoints, &["lease", "revoke", &lease]));
    assert!(revoked_again.contains("requested lease not found"), "{revoked_again}");

    // A lease nobody keeps alive expires, and its keys go with it.
    let short = granted_lease(&ok(cluster.etcdctl(&endpoints, &["lease", "grant", "2"])));
    ok(cluster.etcdctl(&endpoints, &["put", "ephemeral", "x", &format!("--lease={short}")]));
    eventually("the unrenewed lease to expire", || async {
        ok(cluster.etcdctl(&endpoints, &["get", "ephemeral"])).trim().is_empty().then_some(())
    })
    .await;
    let expired = ok(cluster.etcdctl(&endpoints, &["lease", "timetolive", &short]));
    assert!(expired.contains("already expired"), "{expired}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_extends_leases_instead_of_expiring_them() {
    let mut cluster = TestCluster::start(3);
    let leader = cluster.leader().await;
    let endpoints = cluster.endpoints();
    let lease = granted_lease(&ok(cluster.etcdctl(&endpoints, &["lease", "grant", "30"])));
    ok(cluster.etcdctl(&endpoints, &["put", "held", "x", &format!("--lease={lease}")]));

    cluster.members[leader].kill9();
    let new_leader = cluster.leader().await;
    assert_ne!(new_leader, leader);
    let survivor = cluster.members[new_leader].endpoint();
    let ttl = ok(cluster.etcdctl(&survivor, &["lease", "timetolive", &lease, "--keys"]));
    let remaining: i64 = ttl
        .split("remaining(")
        .nth(1)
        .and_then(|rest| rest.split('s').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("remaining TTL in {ttl}"));
    // The new leader started the lease's full TTL afresh when it took over.
    assert!(remaining > 25 && remaining <= 30, "{ttl}");
    assert_eq!(ok(cluster.etcdctl(&survivor, &["get", "held", "--print-value-only"])).trim(), "x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_lease_and_txn_input_gets_etcds_errors() {
    let cluster = TestCluster::start(1);
    cluster.leader().await;
    let endpoint = cluster.endpoints();
    let unknown = failed(cluster.etcdctl(&endpoint, &["lease", "revoke", "1234"]));
    assert!(unknown.contains("requested lease not found"), "{unknown}");
    // The server answers TTL 0; etcd's client library turns that into the error.
    let kept = failed(cluster.etcdctl(&endpoint, &["lease", "keep-alive", "--once", "1234"]));
    assert!(kept.contains("requested lease not found"), "{kept}");
    let huge = failed(cluster.etcdctl(&endpoint, &["lease", "grant", "9000000001"]));
    assert!(huge.contains("too large lease TTL"), "{huge}");
    let lease_in_txn = "\nput k v --lease=1234\n\n\n";
    let refused = failed(etcdctl(&endpoint, &["txn"], Some(lease_in_txn)));
    assert!(refused.contains("requested lease not found"), "{refused}");
    assert_eq!(ok(cluster.etcdctl(&endpoint, &["get", "k"])).trim(), "");
}
