//! Volumes of a pod as host directories: emptyDir under the pod dir, PVC -> PV -> its local
//! or hostPath directory, secret/configMap/downwardAPI/projected files written by the kubelet
//! (service-account tokens through the TokenRequest API, bound to the pod, refreshed before
//! they expire), fsGroup ownership; and the bind mounts of each container.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapProjection, Container, DownwardAPIVolumeFile, KeyToPath, PersistentVolume,
    PersistentVolumeClaim, Pod, ProjectedVolumeSource, Secret, ServiceAccount, ServiceAccountTokenProjection,
    Volume, VolumeProjection,
};
use kube::api::PostParams;
use kube::{Api, Client};

use super::env::Sources;
use super::podman::Mount;

pub const SERVICE_ACCOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
const AUTO_SA_VOLUME: &str = "kube-api-access-kubelet";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    EmptyDir,
    Claim,
    HostPath,
    /// Files the kubelet writes (secret, configMap, downwardAPI, projected): read-only.
    Written,
}

#[derive(Debug, Clone)]
pub struct Prepared {
    pub path: PathBuf,
    pub kind: Kind,
    pub read_only: bool,
}

/// The pod's volumes once prepared, and when its tokens must be renewed.
#[derive(Debug, Default)]
pub struct PodVolumes {
    pub volumes: BTreeMap<String, Prepared>,
    pub refresh_at: Option<Instant>,
}

/// The volumes of the pod, including the service-account volume when the API server's
/// admission did not add one and automounting is not switched off.
pub fn effective_volumes(pod: &Pod) -> Vec<Volume> {
    let spec = pod.spec.as_ref();
    let mut vols: Vec<Volume> = spec.and_then(|s| s.volumes.clone()).unwrap_or_default();
    let automount = spec.and_then(|s| s.automount_service_account_token).unwrap_or(true);
    let mounted = spec
        .into_iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.volume_mounts.iter().flatten())
        .any(|m| m.mount_path == SERVICE_ACCOUNT_PATH);
    if automount && !mounted {
        vols.push(Volume {
            name: AUTO_SA_VOLUME.into(),
            projected: Some(service_account_projection()),
            ..Volume::default()
        });
    }
    vols
}

/// What the ServiceAccount admission plugin injects.
fn service_account_projection() -> ProjectedVolumeSource {
    ProjectedVolumeSource {
        default_mode: Some(0o644),
        sources: Some(vec![
            VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    path: "token".into(),
                    expiration_seconds: Some(3607),
                    audience: None,
                }),
                ..VolumeProjection::default()
            },
            VolumeProjection {
                config_map: Some(ConfigMapProjection {
                    name: "kube-root-ca.crt".into(),
                    items: Some(vec![KeyToPath { key: "ca.crt".into(), path: "ca.crt".into(), mode: None }]),
                    optional: None,
                }),
                ..VolumeProjection::default()
            },
            VolumeProjection {
                downward_api: Some(k8s_openapi::api::core::v1::DownwardAPIProjection {
                    items: Some(vec![DownwardAPIVolumeFile {
                        path: "namespace".into(),
                        field_ref: Some(k8s_openapi::api::core::v1::ObjectFieldSelector {
                            field_path: "metadata.namespace".into(),
                            api_version: Some("v1".into()),
                        }),
                        ..DownwardAPIVolumeFile::default()
                    }]),
                }),
                ..VolumeProjection::default()
            },
        ]),
    }
}

/// Bind mounts of `container`, with the automatic service-account mount added when needed.
pub fn mounts(pod: &Pod, container: &Container, prepared: &PodVolumes) -> Result<Vec<Mount>> {
    let mut out = Vec::new();
    for m in container.volume_mounts.iter().flatten() {
        let vol =
            prepared.volumes.get(&m.name).with_context(|| format!("volume {} is not prepared", m.name))?;
        let mut host = vol.path.clone();
        if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            if sub.split('/').any(|p| p == "..") || sub.starts_with('/') {
                bail!("subPath {sub} must be a relative path inside the volume");
            }
            host = host.join(sub);
            if !host.exists() {
                std::fs::create_dir_all(&host)?;
            }
        }
        out.push(Mount {
            host,
            container: m.mount_path.clone(),
            read_only: m.read_only.unwrap_or(false) || vol.read_only,
        });
    }
    let has_sa = out.iter().any(|m| m.container == SERVICE_ACCOUNT_PATH);
    if !has_sa && let Some(v) = prepared.volumes.get(AUTO_SA_VOLUME) {
        let automount = pod.spec.as_ref().and_then(|s| s.automount_service_account_token).unwrap_or(true);
        if automount {
            out.push(Mount { host: v.path.clone(), container: SERVICE_ACCOUNT_PATH.into(), read_only: true });
        }
    }
    Ok(out)
}

/// Everything the pod's env and volumes name, fetched with the node's own credentials.
pub async fn fetch_sources(client: &Client, pod: &Pod) -> Result<Sources> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut sources = Sources::default();
    let containers =
        pod.spec.iter().flat_map(|s| s.containers.iter().chain(s.init_containers.iter().flatten()));
    let mut cms = Vec::new();
    let mut secrets = Vec::new();
    for c in containers {
        for e in c.env.iter().flatten().filter_map(|e| e.value_from.as_ref()) {
            if let Some(r) = &e.config_map_key_ref {
                cms.push((r.name.clone(), r.optional.unwrap_or(false)));
            }
            if let Some(r) = &e.secret_key_ref {
                secrets.push((r.name.clone(), r.optional.unwrap_or(false)));
            }
        }
        for f in c.env_from.iter().flatten() {
            if let Some(r) = &f.config_map_ref {
                cms.push((r.name.clone(), r.optional.unwrap_or(false)));
            }
            if let Some(r) = &f.secret_ref {
                secrets.push((r.name.clone(), r.optional.unwrap_or(false)));
            }
        }
    }
    let cm_api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    for (name, optional) in cms {
        if sources.config_maps.contains_key(&name) {
            continue;
        }
        match cm_api.get_opt(&name).await? {
            Some(cm) => {
                sources.config_maps.insert(name, config_map_data(&cm));
            }
            None if optional => {}
            None => bail!("configmap {name} not found"),
        }
    }
    let secret_api: Api<Secret> = Api::namespaced(client.clone(), ns);
    for (name, optional) in secrets {
        if sources.secrets.contains_key(&name) {
            continue;
        }
        match secret_api.get_opt(&name).await? {
            Some(s) => {
                sources.secrets.insert(
                    name,
                    secret_data(&s)
                        .into_iter()
                        .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
                        .collect(),
                );
            }
            None if optional => {}
            None => bail!("secret {name} not found"),
        }
    }
    Ok(sources)
}

fn config_map_data(cm: &ConfigMap) -> BTreeMap<String, String> {
    let mut out = cm.data.clone().unwrap_or_default();
    for (k, v) in cm.binary_data.iter().flatten() {
        out.insert(k.clone(), String::from_utf8_lossy(&v.0).into_owned());
    }
    out
}

fn config_map_bytes(cm: &ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> =
        cm.data.iter().flatten().map(|(k, v)| (k.clone(), v.clone().into_bytes())).collect();
    for (k, v) in cm.binary_data.iter().flatten() {
        out.insert(k.clone(), v.0.clone());
    }
    out
}

fn secret_data(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> =
        s.data.iter().flatten().map(|(k, v)| (k.clone(), v.0.clone())).collect();
    for (k, v) in s.string_data.iter().flatten() {
        out.insert(k.clone(), v.clone().into_bytes());
    }
    out
}

/// Prepares every volume of the pod under `pod_dir`.
pub async fn prepare(client: &Client, pod: &Pod, pod_dir: &Path) -> Result<PodVolumes> {
    let mut out = PodVolumes::default();
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let fs_group = sc.and_then(|s| s.fs_group);
    let on_root_mismatch = sc.and_then(|s| s.fs_group_change_policy.as_deref()) == Some("OnRootMismatch");
    for vol in effective_volumes(pod) {
        let name = vol.name.clone();
        let prepared = if vol.empty_dir.is_some() {
            let path = pod_dir.join("volumes/empty-dir").join(&name);
            std::fs::create_dir_all(&path)?;
            // World-writable like the kubelet's emptyDir (0777), so any container user can use it.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777))?;
            if let Some(gid) = fs_group {
                apply_fs_group(&path, gid as u32, on_root_mismatch)?;
            }
            Prepared { path, kind: Kind::EmptyDir, read_only: false }
        } else if let Some(claim) = &vol.persistent_volume_claim {
            let path = claim_path(client, ns, &claim.claim_name).await?;
            if let Some(gid) = fs_group {
                apply_fs_group(&path, gid as u32, on_root_mismatch)?;
            }
            Prepared { path, kind: Kind::Claim, read_only: claim.read_only.unwrap_or(false) }
        } else if let Some(hp) = &vol.host_path {
            let path = PathBuf::from(&hp.path);
            if matches!(hp.type_.as_deref(), Some("DirectoryOrCreate")) {
                std::fs::create_dir_all(&path)?;
            }
            Prepared { path, kind: Kind::HostPath, read_only: false }
        } else if vol.secret.is_some()
            || vol.config_map.is_some()
            || vol.downward_api.is_some()
            || vol.projected.is_some()
        {
            let path = pod_dir.join("volumes/written").join(&name);
            std::fs::create_dir_all(&path)?;
            if let Some(refresh) = write_files(client, pod, &vol, &path).await? {
                out.refresh_at = Some(out.refresh_at.map_or(refresh, |r: Instant| r.min(refresh)));
            }
            if let Some(gid) = fs_group {
                apply_fs_group(&path, gid as u32, false)?;
            }
            Prepared { path, kind: Kind::Written, read_only: true }
        } else {
            bail!("volume {name}: unsupported volume type");
        };
        out.volumes.insert(name, prepared);
    }
    Ok(out)
}

/// Rewrites the written volumes (new tokens, changed ConfigMaps); returns the next refresh.
pub async fn refresh(client: &Client, pod: &Pod, vols: &mut PodVolumes) -> Result<()> {
    let mut next: Option<Instant> = None;
    let fs_group = pod.spec.as_ref().and_then(|s| s.security_context.as_ref()).and_then(|s| s.fs_group);
    for vol in effective_volumes(pod) {
        let Some(p) = vols.volumes.get(&vol.name) else { continue };
        if p.kind != Kind::Written {
            continue;
        }
        if let Some(r) = write_files(client, pod, &vol, &p.path).await? {
            next = Some(next.map_or(r, |n| n.min(r)));
        }
        if let Some(gid) = fs_group {
            apply_fs_group(&p.path, gid as u32, false)?;
        }
    }
    vols.refresh_at = next.or(Some(Instant::now() + Duration::from_secs(60)));
    Ok(())
}

async fn claim_path(client: &Client, ns: &str, claim: &str) -> Result<PathBuf> {
    let pvc = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .get(claim)
        .await
        .with_context(|| format!("persistentvolumeclaim {claim}"))?;
    let pv_name = pvc
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .filter(|n| !n.is_empty())
        .with_context(|| format!("persistentvolumeclaim {claim} is not bound"))?;
    let pv = Api::<PersistentVolume>::all(client.clone())
        .get(&pv_name)
        .await
        .with_context(|| format!("persistentvolume {pv_name}"))?;
    let spec = pv.spec.as_ref().context("persistentvolume without spec")?;
    let path = spec
        .local
        .as_ref()
        .map(|l| l.path.clone())
        .or_else(|| spec.host_path.as_ref().map(|h| h.path.clone()))
        .with_context(|| format!("persistentvolume {pv_name} is neither local nor hostPath"))?;
    let path = PathBuf::from(path);
    if !path.is_dir() {
        std::fs::create_dir_all(&path).with_context(|| format!("volume directory {}", path.display()))?;
    }
    Ok(path)
}

/// Makes `path` (recursively) owned by group `gid` and group-writable, as the kubelet does
/// for fsGroup; with OnRootMismatch nothing is done when the root already fits.
pub fn apply_fs_group(path: &Path, gid: u32, on_root_mismatch: bool) -> Result<()> {
    if on_root_mismatch && root_matches(path, gid)? {
        return Ok(());
    }
    walk(path, &mut |p, meta| {
        std::os::unix::fs::lchown(p, None, Some(gid)).with_context(|| format!("chown {}", p.display()))?;
        if meta.file_type().is_symlink() {
            return Ok(());
        }
        let mode = meta.mode() & 0o7777;
        let new = if meta.is_dir() { mode | 0o2070 } else { mode | 0o060 };
        // Written volumes keep their files' modes readable-only for the group.
        let new = if meta.is_dir() {
            new
        } else if mode & 0o200 == 0 {
            (mode | 0o040) & !0o020
        } else {
            new
        };
        if new != mode {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(new))?;
        }
        Ok(())
    })
}

fn root_matches(path: &Path, gid: u32) -> Result<bool> {
    let meta = std::fs::metadata(path)?;
    Ok(meta.gid() == gid && meta.mode() & 0o2070 == 0o2070)
}

fn walk(path: &Path, f: &mut dyn FnMut(&Path, &std::fs::Metadata) -> Result<()>) -> Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    f(path, &meta)?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            walk(&entry?.path(), f)?;
        }
    }
    Ok(())
}

/// Writes one file through a rename, so a reader never sees half a token.
fn put(dir: &Path, rel: &str, data: &[u8], mode: u32) -> Result<()> {
    if rel.split('/').any(|p| p == "..") || rel.starts_with('/') {
        bail!("path {rel} must stay inside the volume");
    }
    let target = dir.join(rel);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp =
        target.with_file_name(format!(".{}.tmp", target.file_name().and_then(|n| n.to_str()).unwrap_or("f")));
    std::fs::write(&tmp, data)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, &target)?;
    Ok(())
}

/// The files of `items` (or of every key) of `data`.
pub fn select_items<'a>(
    data: &'a BTreeMap<String, Vec<u8>>,
    items: Option<&'a [KeyToPath]>,
    default_mode: u32,
) -> Result<Vec<(String, &'a [u8], u32)>> {
    match items {
        Some(items) if !items.is_empty() => items
            .iter()
            .map(|i| {
                let bytes = data.get(&i.key).with_context(|| format!("key {} not found", i.key))?;
                Ok((i.path.clone(), bytes.as_slice(), i.mode.map(|m| m as u32).unwrap_or(default_mode)))
            })
            .collect(),
        _ => Ok(data.iter().map(|(k, v)| (k.clone(), v.as_slice(), default_mode)).collect()),
    }
}

/// Writes a secret/configMap/downwardAPI/projected volume; returns when its token (if any)
/// must be renewed: at 80% of its lifetime, as the kubelet does.
async fn write_files(client: &Client, pod: &Pod, vol: &Volume, dir: &Path) -> Result<Option<Instant>> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut refresh = None;
    if let Some(s) = &vol.secret {
        let name = s.secret_name.as_deref().unwrap_or_default();
        let mode = s.default_mode.unwrap_or(0o644) as u32;
        write_keys(client, ns, KeySource::Secret(name), s.items.as_deref(), s.optional, mode, dir).await?;
    } else if let Some(c) = &vol.config_map {
        let mode = c.default_mode.unwrap_or(0o644) as u32;
        write_keys(client, ns, KeySource::ConfigMap(&c.name), c.items.as_deref(), c.optional, mode, dir)
            .await?;
    } else if let Some(d) = &vol.downward_api {
        write_downward(pod, d.items.as_deref().unwrap_or_default(), d.default_mode, dir)?;
    } else if let Some(p) = &vol.projected {
        let mode = p.default_mode.unwrap_or(0o644) as u32;
        for source in p.sources.iter().flatten() {
            if let Some(t) = &source.service_account_token {
                let (token, lifetime) = request_token(client, pod, t).await?;
                put(dir, &t.path, token.as_bytes(), mode)?;
                let at = Instant::now() + lifetime.mul_f64(0.8);
                refresh = Some(refresh.map_or(at, |r: Instant| r.min(at)));
            }
            if let Some(c) = &source.config_map {
                write_keys(
                    client,
                    ns,
                    KeySource::ConfigMap(&c.name),
                    c.items.as_deref(),
                    c.optional,
                    mode,
                    dir,
                )
                .await?;
            }
            if let Some(s) = &source.secret {
                write_keys(client, ns, KeySource::Secret(&s.name), s.items.as_deref(), s.optional, mode, dir)
                    .await?;
            }
            if let Some(d) = &source.downward_api {
                write_downward(pod, d.items.as_deref().unwrap_or_default(), Some(mode as i32), dir)?;
            }
        }
    }
    Ok(refresh)
}

/// The object a secret or configMap volume (or projection) takes its files from.
#[derive(Clone, Copy)]
enum KeySource<'a> {
    Secret(&'a str),
    ConfigMap(&'a str),
}

/// Writes the keys of a Secret or ConfigMap as files: the listed items, else every key. A
/// missing object is an error unless the volume marks it optional.
async fn write_keys(
    client: &Client,
    ns: &str,
    source: KeySource<'_>,
    items: Option<&[KeyToPath]>,
    optional: Option<bool>,
    mode: u32,
    dir: &Path,
) -> Result<()> {
    let data = match source {
        KeySource::Secret(name) => {
            Api::<Secret>::namespaced(client.clone(), ns).get_opt(name).await?.map(|s| secret_data(&s))
        }
        KeySource::ConfigMap(name) => Api::<ConfigMap>::namespaced(client.clone(), ns)
            .get_opt(name)
            .await?
            .map(|c| config_map_bytes(&c)),
    };
    let Some(data) = data else {
        if optional.unwrap_or(false) {
            return Ok(());
        }
        match source {
            KeySource::Secret(name) => bail!("secret {name} not found"),
            KeySource::ConfigMap(name) => bail!("configmap {name} not found"),
        }
    };
    for (path, bytes, file_mode) in select_items(&data, items, mode)? {
        put(dir, &path, bytes, file_mode)?;
    }
    Ok(())
}

/// Writes a downwardAPI volume's (or projection's) files.
fn write_downward(
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
    default_mode: Option<i32>,
    dir: &Path,
) -> Result<()> {
    let mode = default_mode.unwrap_or(0o644) as u32;
    for item in items {
        put(
            dir,
            &item.path,
            downward_value(pod, item)?.as_bytes(),
            item.mode.map(|m| m as u32).unwrap_or(mode),
        )?;
    }
    Ok(())
}

/// A downwardAPI volume file's content.
pub fn downward_value(pod: &Pod, item: &DownwardAPIVolumeFile) -> Result<String> {
    let Some(f) = &item.field_ref else {
        bail!("downwardAPI item {}: only fieldRef is supported", item.path)
    };
    let meta = &pod.metadata;
    let map_text = |m: Option<&BTreeMap<String, String>>| {
        m.iter().flat_map(|m| m.iter()).map(|(k, v)| format!("{k}=\"{v}\"\n")).collect::<String>()
    };
    Ok(match f.field_path.as_str() {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "metadata.labels" => map_text(meta.labels.as_ref()),
        "metadata.annotations" => map_text(meta.annotations.as_ref()),
        other => bail!("unsupported downwardAPI field {other}"),
    })
}

/// A token for the pod's service account, bound to the pod (so it dies with it).
async fn request_token(
    client: &Client,
    pod: &Pod,
    t: &ServiceAccountTokenProjection,
) -> Result<(String, Duration)> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let sa =
        pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into());
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: t.audience.iter().cloned().collect(),
            expiration_seconds: Some(t.expiration_seconds.unwrap_or(3600)),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..TokenRequest::default()
    };
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let resp = api
        .create_token_request(&sa, &PostParams::default(), &req)
        .await
        .with_context(|| format!("token for serviceaccount {ns}/{sa}"))?;
    let status = resp.status.context("token request without status")?;
    let lifetime = resp
        .spec
        .expiration_seconds
        .map(|s| Duration::from_secs(s.max(60) as u64))
        .unwrap_or(Duration::from_secs(3600));
    // The server may grant less (or, with extended expiry, more) than asked: trust its stamp.
    let until = status.expiration_timestamp.0;
    let now = k8s_openapi::jiff::Timestamp::now();
    let left = until.duration_since(now);
    let granted = std::time::Duration::try_from(left).ok().filter(|d| !d.is_zero()).unwrap_or(lifetime);
    Ok((status.token, granted.min(Duration::from_secs(24 * 3600))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, VolumeMount};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[test]
    fn service_account_volume_added_unless_switched_off_or_present() {
        let mut pod = Pod {
            metadata: ObjectMeta::default(),
            spec: Some(PodSpec {
                containers: vec![Container { name: "c".into(), ..Container::default() }],
                ..PodSpec::default()
            }),
            status: None,
        };
        assert!(effective_volumes(&pod).iter().any(|v| v.name == AUTO_SA_VOLUME));
        pod.spec.as_mut().unwrap().automount_service_account_token = Some(false);
        assert!(effective_volumes(&pod).is_empty());
        let spec = pod.spec.as_mut().unwrap();
        spec.automount_service_account_token = None;
        spec.containers[0].volume_mounts = Some(vec![VolumeMount {
            name: "kube-api-access-x".into(),
            mount_path: SERVICE_ACCOUNT_PATH.into(),
            ..VolumeMount::default()
        }]);
        assert!(
            !effective_volumes(&pod).iter().any(|v| v.name == AUTO_SA_VOLUME),
            "admission already added one"
        );
    }

    #[test]
    fn items_select_and_rename_keys() {
        let data = BTreeMap::from([("a".to_owned(), b"1".to_vec()), ("b".to_owned(), b"2".to_vec())]);
        let all = select_items(&data, None, 0o644).unwrap();
        assert_eq!(all.len(), 2);
        let items = [KeyToPath { key: "b".into(), path: "dir/bee".into(), mode: Some(0o600) }];
        let some = select_items(&data, Some(&items), 0o644).unwrap();
        assert_eq!(some, vec![("dir/bee".to_owned(), b"2".as_slice(), 0o600)]);
        let missing = [KeyToPath { key: "z".into(), path: "z".into(), mode: None }];
        assert!(select_items(&data, Some(&missing), 0o644).is_err());
    }

    #[test]
    fn files_stay_inside_the_volume() {
        let dir = tempfile::tempdir().unwrap();
        put(dir.path(), "sub/token", b"t", 0o644).unwrap();
        assert_eq!(std::fs::read(dir.path().join("sub/token")).unwrap(), b"t");
        assert!(put(dir.path(), "../escape", b"x", 0o644).is_err());
    }

    #[test]
    fn fs_group_makes_directories_group_writable() {
        let dir = tempfile::tempdir().unwrap();
        let gid = nix_getgid();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/f"), b"x").unwrap();
        std::fs::set_permissions(dir.path().join("d"), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(dir.path().join("d/f"), std::fs::Permissions::from_mode(0o600)).unwrap();
        apply_fs_group(dir.path(), gid, false).unwrap();
        let m = |p: &str| std::fs::metadata(dir.path().join(p)).unwrap().mode() & 0o7777;
        assert_eq!(m("d"), 0o2770);
        assert_eq!(m("d/f"), 0o660);
        assert!(root_matches(dir.path(), gid).unwrap());
        // OnRootMismatch leaves a matching tree alone even when a file inside differs.
        std::fs::set_permissions(dir.path().join("d/f"), std::fs::Permissions::from_mode(0o600)).unwrap();
        apply_fs_group(dir.path(), gid, true).unwrap();
        assert_eq!(m("d/f"), 0o600);
    }

    fn nix_getgid() -> u32 {
        // SAFETY: getgid has no preconditions.
        unsafe { libc::getgid() }
    }
}
