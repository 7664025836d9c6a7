//! The objects built for every sample in manifests/samples are pinned in tests/golden/.
//! After an intended change: `UPDATE_GOLDEN=1 cargo test -p consensus-operator --test golden`,
//! then read the diff before committing it.

use std::path::{Path, PathBuf};

use consensus_crds::ConsensusCluster;
use consensus_operator::plan::backup::backup_name;
use consensus_operator::resources::backup::{BackupJob, job};
use consensus_operator::resources::{Desired, Guarded, InitialClusterState, Members, desired};
use k8s_openapi::api::batch::v1::Job;

const HEADER: &str = "# Built by consensus-operator's resource builders for the sample of the same name\n\
# (namespace default, a fixed uid). Regenerate: UPDATE_GOLDEN=1 cargo test -p consensus-operator --test golden\n";

/// A uid like the API server's, fixed so the files are stable.
const UID: &str = "7f3c2a10-0000-4000-8000-000000000001";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn samples() -> Vec<PathBuf> {
    let mut samples: Vec<PathBuf> = std::fs::read_dir(repo().join("manifests/samples"))
        .expect("samples directory")
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .filter(|path| path.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .collect();
    samples.sort();
    samples
}

fn render((built, backup): &(Desired, Option<Job>)) -> String {
    let mut documents = vec![
        serde_yaml::to_string(&built.config_map),
        serde_yaml::to_string(&built.peer_service),
        serde_yaml::to_string(&built.client_service),
        serde_yaml::to_string(&built.pod_disruption_budget),
        serde_yaml::to_string(&built.stateful_set),
    ];
    documents.extend(backup.as_ref().map(serde_yaml::to_string));
    let documents: Vec<String> = documents.into_iter().map(|d| d.expect("serializes")).collect();
    format!("{HEADER}{}", documents.iter().map(|d| format!("---\n{d}")).collect::<String>())
}

/// The objects, and for a sample with backups the Job of its first backup (taken from
/// member 1 for the slot 2026-12-01T06:00:00Z).
fn built_for(sample: &Path) -> (Desired, Option<Job>) {
    let text = std::fs::read_to_string(sample).expect("sample readable");
    let mut cluster: ConsensusCluster = serde_yaml::from_str(&text).expect("sample is a ConsensusCluster");
    cluster.metadata.namespace.get_or_insert_with(|| "default".to_owned());
    cluster.metadata.uid = Some(UID.to_owned());
    // As first created: no member has answered yet, so no voter is known to spare.
    let replicas = cluster.spec.replicas;
    let guarded = Guarded { pods: replicas, voters: None };
    let members = Members { replicas, state: InitialClusterState::New, guarded };
    let slot = "2026-12-01T06:00:00Z".parse().expect("a time");
    let name = cluster.metadata.name.clone().expect("a name");
    let backup = backup_name(&name, slot, None);
    let member = format!("{name}-1");
    let run = BackupJob::planned(&cluster.spec, &backup, (slot, 1, &member), None);
    let job = run.map(|run| job(&cluster, &run, None).expect("builds"));
    (desired(&cluster, members).expect("builds"), job)
}

#[test]
fn built_objects_match_the_golden_files() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let samples = samples();
    assert!(samples.len() >= 3, "expected the samples under manifests/samples, found {samples:?}");
    let mut stale = Vec::new();
    for sample in samples {
        let golden = repo().join("operator/tests/golden").join(sample.file_name().expect("file name"));
        let rendered = render(&built_for(&sample));
        if update {
            std::fs::write(&golden, &rendered).expect("golden file written");
        } else if std::fs::read_to_string(&golden).ok().as_deref() != Some(rendered.as_str()) {
            stale.push(golden.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "built objects differ from {stale:?}; if the change is intended, rerun with UPDATE_GOLDEN=1 and commit the diff"
    );
}

#[test]
fn every_golden_file_has_a_sample() {
    let samples: Vec<_> = samples().iter().filter_map(|p| p.file_name().map(|n| n.to_owned())).collect();
    for entry in std::fs::read_dir(repo().join("operator/tests/golden")).expect("golden directory") {
        let name = entry.expect("directory entry").file_name();
        assert!(samples.contains(&name), "{name:?} has no sample left: delete it");
    }
}
