//! Spec and status survive serialization unchanged, in JSON (the API server's wire format)
//! and YAML (what users write).

use std::collections::BTreeMap;

use consensus_crds::*;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use proptest::prelude::*;

fn full_spec(replicas: i32, labels: BTreeMap<String, String>, auto_restore: bool) -> ConsensusClusterSpec {
    ConsensusClusterSpec {
        replicas,
        image: "registry.example/consensus-node:1.2.3".into(),
        version: Some("1.2.3".into()),
        storage: StorageSpec {
            size: "20Gi".into(),
            storage_class_name: Some("fast-ssd".into()),
            reclaim_policy: VolumeReclaimPolicy::Delete,
            existing_volumes: ExistingVolumePolicy::Adopt,
        },
        resources: None,
        placement: PlacementSpec {
            zone_topology_key: "example.com/rack".into(),
            zone_spread: ZoneSpread::Preferred,
            node_selector: BTreeMap::from([("disk".into(), "ssd".into())]),
            tolerations: vec![],
            affinity: None,
        },
        backup: Some(BackupSpec {
            schedule: "0 */6 * * *".into(),
            destination: BackupDestination {
                s3: Some(S3Destination {
                    bucket: "platform-backups".into(),
                    prefix: Some("prod/locks".into()),
                    endpoint: Some("https://minio.storage.svc:9000".into()),
                    region: "eu-west-1".into(),
                    force_path_style: true,
                    credentials_secret: S3CredentialsSecretRef {
                        name: "backup-credentials".into(),
                        access_key_id_key: "id".into(),
                        secret_access_key_key: "secret".into(),
                    },
                }),
                volume: None,
            },
            retention: RetentionSpec { max_count: 30, max_age: Some("30d".into()), tiered: true },
            suspend: auto_restore,
        }),
        recovery: RecoverySpec { auto_restore, quorum_loss_timeout: "15m".into() },
        bootstrap: Some(BootstrapSpec {
            from_backup: Some(FromBackupSpec {
                location: (!auto_restore).then(|| "s3://platform-backups/prod/locks/locks-1.snapshot".into()),
            }),
        }),
        pod_template: PodTemplateOverrides {
            labels,
            annotations: BTreeMap::from([("team".into(), "platform".into())]),
            priority_class_name: Some("system-cluster-critical".into()),
        },
    }
}

fn full_status(caught_up: bool) -> ConsensusClusterStatus {
    let time = Time(Timestamp::from_second(1_790_000_000).expect("valid timestamp"));
    ConsensusClusterStatus {
        observed_generation: Some(4),
        phase: Some(Phase::Running),
        replicas: 3,
        ready_replicas: 3,
        selector: Some("app.kubernetes.io/instance=demo".into()),
        members: vec![MemberStatus {
            name: "demo-0".into(),
            id: "8e9e05c52164694d".into(),
            role: MemberRole::Leader,
            zone: Some("zone-a".into()),
            healthy: true,
            caught_up: Some(caught_up),
        }],
        leader: Some("demo-0".into()),
        cluster_id: Some("cdf818194e3a8c32".into()),
        version: Some("1.2.3".into()),
        conditions: vec![Condition {
            type_: condition::AVAILABLE.into(),
            status: "True".into(),
            observed_generation: Some(4),
            reason: "QuorumHealthy".into(),
            message: "3 of 3 voters healthy".into(),
            last_transition_time: time.clone(),
        }],
        last_backup: Some(BackupRecord {
            name: "demo-20260922T000000Z".into(),
            time: time.clone(),
            location: "s3://platform-backups/prod/locks/demo-20260922T000000Z.snapshot".into(),
            revision: 1234,
            size_bytes: 65_536,
            sha256: "ab".repeat(32),
            verified: Some(true),
        }),
        next_backup: Some(time.clone()),
        last_scheduled_backup: Some(time.clone()),
        recovery: None,
        last_recovery: Some(RecoveryRecord {
            source: RecoverySource::Survivor,
            from: "demo-2".into(),
            applied_index: Some(120),
            previous_cluster_id: Some("abc".into()),
            cluster_token: "recovered-1".into(),
            quorum_lost: Some(time.clone()),
            started: time.clone(),
            finished: Some(time),
            lost_writes: "none that demo-2 had applied".into(),
            requested: None,
        }),
    }
}

proptest! {
    #[test]
    fn spec_round_trips_through_json_and_yaml(
        replicas in -20i32..20,
        labels in proptest::collection::btree_map("[a-z]{1,8}", "[a-z0-9]{0,8}", 0..4),
        auto_restore in any::<bool>(),
    ) {
        let spec = full_spec(replicas, labels, auto_restore);
        let json: ConsensusClusterSpec = serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
        prop_assert_eq!(&json, &spec);
        let yaml: ConsensusClusterSpec = serde_yaml::from_str(&serde_yaml::to_string(&spec).unwrap()).unwrap();
        prop_assert_eq!(&yaml, &spec);
    }

    #[test]
    fn status_round_trips_through_json_and_yaml(caught_up in any::<bool>()) {
        let status = full_status(caught_up);
        let json: ConsensusClusterStatus = serde_json::from_str(&serde_json::to_string(&status).unwrap()).unwrap();
        prop_assert_eq!(&json, &status);
        let yaml: ConsensusClusterStatus = serde_yaml::from_str(&serde_yaml::to_string(&status).unwrap()).unwrap();
        prop_assert_eq!(&yaml, &status);
    }
}

#[test]
fn status_uses_the_field_names_of_the_kubernetes_conventions() {
    let json = serde_json::to_value(full_status(true)).unwrap();
    assert_eq!(json["observedGeneration"], 4);
    assert_eq!(json["readyReplicas"], 3);
    assert_eq!(json["members"][0]["caughtUp"], true);
    assert_eq!(json["members"][0]["role"], "Leader");
    assert_eq!(json["conditions"][0]["type"], "Available");
    assert_eq!(json["conditions"][0]["lastTransitionTime"], "2026-09-21T14:13:20Z");
    assert_eq!(json["lastBackup"]["sizeBytes"], 65_536);
}
