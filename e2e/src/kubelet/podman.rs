//! The container runtime: podman with runc. `run_args` turns a container of a PodSpec into
//! `podman run` arguments (pure, tested); the rest runs podman.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Container, PodSecurityContext, SecurityContext};
use serde::Deserialize;
use tokio::process::Command;

pub const NODE_LABEL: &str = "consensus-dev.node";
pub const POD_UID_LABEL: &str = "consensus-dev.pod-uid";

/// Global flags for every podman call (crun and systemd do not work here).
pub fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "file"]);
    cmd.stdin(Stdio::null());
    cmd.kill_on_drop(true);
    cmd
}

/// `consensus-node:0.1.0` -> `localhost/consensus-node:0.1.0`; a name without a tag gets
/// `:latest`. Names with a registry host stay as they are (and will not be in the store).
pub fn qualify_image(image: &str) -> String {
    let (first, rest) = match image.split_once('/') {
        Some((f, r)) => (Some(f), r),
        None => (None, image),
    };
    let tagged = if rest.contains('@') || rest.rsplit('/').next().is_some_and(|last| last.contains(':')) {
        image.to_owned()
    } else {
        format!("{image}:latest")
    };
    match first {
        Some(f) if f.contains('.') || f.contains(':') || f == "localhost" => tagged,
        _ => format!("localhost/{tagged}"),
    }
}

/// The user and groups a container runs as: container securityContext over the pod's.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    pub uid: Option<i64>,
    pub gid: Option<i64>,
    pub run_as_non_root: bool,
    pub groups: Vec<i64>,
}

pub fn identity(pod: Option<&PodSecurityContext>, container: Option<&SecurityContext>) -> Identity {
    let uid = container.and_then(|c| c.run_as_user).or(pod.and_then(|p| p.run_as_user));
    let gid = container.and_then(|c| c.run_as_group).or(pod.and_then(|p| p.run_as_group));
    let run_as_non_root =
        container.and_then(|c| c.run_as_non_root).or(pod.and_then(|p| p.run_as_non_root)).unwrap_or(false);
    let mut groups = Vec::new();
    if let Some(p) = pod {
        groups.extend(p.fs_group);
        groups.extend(p.supplemental_groups.iter().flatten().copied());
    }
    groups.dedup();
    Identity { uid, gid, run_as_non_root, groups }
}

/// Whether an image's configured `User` (from `podman image inspect`) would run as root
/// when no runAsUser overrides it. A name other than root cannot be checked: refused too,
/// as the kubelet does ("non-numeric user").
pub fn image_user_is_root(user: &str) -> Result<bool> {
    let name = user.split(':').next().unwrap_or("");
    if name.is_empty() || name == "root" {
        return Ok(true);
    }
    match name.parse::<i64>() {
        Ok(uid) => Ok(uid == 0),
        Err(_) => bail!("image has non-numeric user ({name}), cannot verify user is non-root"),
    }
}

/// A bind mount into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub host: PathBuf,
    pub container: String,
    pub read_only: bool,
}

/// Everything `podman run` needs beyond the Container itself.
pub struct RunInput<'a> {
    pub name: &'a str,
    pub image: &'a str,
    pub netns: &'a str,
    pub hostname: &'a str,
    pub labels: Vec<(String, String)>,
    pub env: &'a [(String, String)],
    pub command: Option<Vec<String>>,
    pub args: Option<Vec<String>>,
    pub mounts: &'a [Mount],
    pub pod_security: Option<&'a PodSecurityContext>,
    pub log_path: &'a str,
    pub ulimit_nofile: u64,
    pub ulimit_nproc: u64,
}

/// The arguments after `podman run`.
pub fn run_args(container: &Container, input: &RunInput<'_>) -> Vec<String> {
    let mut a: Vec<String> = vec!["-d".into(), "--name".into(), input.name.into()];
    a.push(format!("--network=ns:{}", input.netns));
    a.push(format!("--hostname={}", input.hostname));
    // /etc/hosts and /etc/resolv.conf are the pod's files, mounted below.
    a.push("--no-hosts".into());
    for (k, v) in &input.labels {
        a.push(format!("--label={k}={v}"));
    }
    a.push("--log-driver=k8s-file".into());
    a.push(format!("--log-opt=path={}", input.log_path));
    a.push(format!("--ulimit=nofile={0}:{0}", input.ulimit_nofile));
    a.push(format!("--ulimit=nproc={0}:{0}", input.ulimit_nproc));

    let sc = container.security_context.as_ref();
    let id = identity(input.pod_security, sc);
    match (id.uid, id.gid) {
        (Some(u), Some(g)) => a.push(format!("--user={u}:{g}")),
        (Some(u), None) => a.push(format!("--user={u}")),
        // A group alone keeps the image's user.
        (None, Some(g)) => a.push(format!("--group-add={g}")),
        (None, None) => {}
    }
    for g in &id.groups {
        a.push(format!("--group-add={g}"));
    }
    let privileged = sc.and_then(|s| s.privileged).unwrap_or(false);
    if privileged {
        a.push("--privileged".into());
    }
    if sc.and_then(|s| s.read_only_root_filesystem).unwrap_or(false) {
        a.push("--read-only".into());
        // The kubelet's containers get no writable /run or /tmp unless a volume provides it.
        a.push("--read-only-tmpfs=false".into());
    }
    if let Some(caps) = sc.and_then(|s| s.capabilities.as_ref()) {
        for c in caps.drop.iter().flatten() {
            a.push(format!("--cap-drop={}", cap_name(c)));
        }
        for c in caps.add.iter().flatten() {
            a.push(format!("--cap-add={}", cap_name(c)));
        }
    }
    if sc.and_then(|s| s.allow_privilege_escalation) == Some(false) {
        a.push("--security-opt=no-new-privileges".into());
    }
    let seccomp = sc
        .and_then(|s| s.seccomp_profile.as_ref())
        .or(input.pod_security.and_then(|p| p.seccomp_profile.as_ref()));
    match seccomp.map(|s| s.type_.as_str()) {
        // podman's default profile is the runtime default.
        Some("RuntimeDefault") => {}
        Some("Localhost") => {
            if let Some(path) = seccomp.and_then(|s| s.localhost_profile.as_ref()) {
                a.push(format!("--security-opt=seccomp={path}"));
            }
        }
        // Unset means Unconfined for a kubelet without SeccompDefault.
        _ if !privileged => a.push("--security-opt=seccomp=unconfined".into()),
        _ => {}
    }
    // Limits become cgroup limits, so a container over its memory is OOMKilled as in Kubernetes.
    let limits = container.resources.as_ref().and_then(|r| r.limits.as_ref());
    if let Some(bytes) = limits.and_then(|l| l.get("memory")).and_then(|q| quantity_bytes(&q.0)) {
        a.push(format!("--memory={bytes}"));
    }
    if let Some(milli) = limits.and_then(|l| l.get("cpu")).and_then(|q| cpu_millis(&q.0)) {
        a.push(format!("--cpus={}.{:03}", milli / 1000, milli % 1000));
    }
    if let Some(dir) = &container.working_dir {
        a.push(format!("--workdir={dir}"));
    }
    for m in input.mounts {
        let ro = if m.read_only { ":ro" } else { "" };
        a.push(format!("--volume={}:{}{}", m.host.display(), m.container, ro));
    }
    for (k, v) in input.env {
        a.push(format!("--env={k}={v}"));
    }
    if let Some(cmd) = &input.command {
        a.push(format!("--entrypoint={}", serde_json::to_string(cmd).expect("strings serialise")));
    }
    a.push(input.image.into());
    a.extend(input.args.iter().flatten().cloned());
    a
}

/// A memory quantity (`512Mi`, `1G`, `1e9`, `1048576`) in bytes.
pub fn quantity_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let num: f64 = num.parse().ok()?;
    let factor: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "m" => 1e-3,
        s if s.starts_with('e') || s.starts_with('E') => 10f64.powi(s[1..].parse().ok()?),
        _ => return None,
    };
    Some((num * factor).ceil() as u64)
}

/// A CPU quantity (`500m`, `2`, `0.25`) in thousandths of a core.
pub fn cpu_millis(q: &str) -> Option<u64> {
    let q = q.trim();
    match q.strip_suffix('m') {
        Some(m) => m.parse().ok(),
        None => q.parse::<f64>().ok().map(|c| (c * 1000.0).ceil() as u64),
    }
    .filter(|m| *m > 0)
}

/// `NET_ADMIN` and `CAP_NET_ADMIN` both name a capability; `ALL` stays.
fn cap_name(c: &str) -> String {
    if c.eq_ignore_ascii_case("all") { "ALL".into() } else { c.trim_start_matches("CAP_").to_uppercase() }
}

/// What `podman inspect` says about a container.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct State {
    pub status: String,
    pub running: bool,
    #[serde(rename = "OOMKilled")]
    pub oom_killed: bool,
    pub exit_code: i32,
    pub started_at: String,
    pub finished_at: String,
    #[serde(default)]
    pub error: String,
    /// The container's first process as the host sees it (0 once it exited).
    #[serde(default)]
    pub pid: i64,
}

/// The start time (clock ticks since boot) of a live, non-zombie process: with the pid it
/// names one process run, so "still running" costs a /proc read instead of a podman call.
pub fn process_start_time(pid: i64) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_start(&stat)
}

/// Field 22 of /proc/PID/stat, unless the state (field 3) says zombie or dead.
pub fn parse_stat_start(stat: &str) -> Option<u64> {
    // The command (field 2) may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if matches!(fields.first(), Some(&"Z") | Some(&"X") | Some(&"x")) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Inspect {
    id: String,
    #[serde(default)]
    name: String,
    state: State,
}

/// `k8s_<container>_<pod>_<ns>_<uid8>_<run>` -> (container, run). Kubernetes names have no
/// underscores, so the parts split cleanly.
pub fn parse_run_name(name: &str) -> Option<(String, i32)> {
    let parts: Vec<&str> = name.split('_').collect();
    if parts.len() != 6 || parts[0] != "k8s" {
        return None;
    }
    Some((parts[1].to_owned(), parts[5].parse().ok()?))
}

/// A container of this kubelet found by label: id, podman name, state.
pub struct Found {
    pub id: String,
    pub name: String,
    pub state: State,
}

pub async fn inspect_found(id: &str) -> Result<Option<Found>> {
    let out = podman()
        .args(["inspect", "--type", "container", id])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await?;
    if !out.status.success() {
        return Ok(None);
    }
    let mut all: Vec<Inspect> = serde_json::from_slice(&out.stdout).context("podman inspect output")?;
    Ok(all.pop().map(|i| Found { id: i.id, name: i.name.trim_start_matches('/').to_owned(), state: i.state }))
}

async fn output(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .with_context(|| format!("podman {what}"))?;
    if !out.status.success() {
        bail!("podman {what}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

pub async fn image_exists(image: &str) -> Result<bool> {
    let status = podman()
        .args(["image", "exists", image])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .context("podman image exists")?;
    Ok(status.success())
}

/// The image's id (`sha256:...`) and configured user.
pub async fn image_info(image: &str) -> Result<(String, String)> {
    let out = output(
        podman().args(["image", "inspect", "--format", "{{.Id}}|{{.Config.User}}", image]),
        "image inspect",
    )
    .await?;
    let (id, user) = out.split_once('|').unwrap_or((&out, ""));
    Ok((format!("sha256:{id}"), user.to_owned()))
}

pub async fn run(args: &[String]) -> Result<String> {
    output(podman().arg("run").args(args), "run").await
}

pub async fn inspect(id: &str) -> Result<Option<(String, State)>> {
    Ok(inspect_found(id).await?.map(|found| (found.id, found.state)))
}

/// SIGTERM, then SIGKILL after `grace` (podman stop does both).
pub async fn stop(id: &str, grace: Duration) -> Result<()> {
    output(podman().args(["stop", "--time", &grace.as_secs().to_string(), id]), "stop").await.map(|_| ())
}

pub async fn remove(id: &str) -> Result<()> {
    output(podman().args(["rm", "--force", "--time", "0", id]), "rm").await.map(|_| ())
}

/// Removes every container carrying `label=value`; how many there were. Fails when they
/// cannot be listed or one cannot be removed.
pub async fn remove_labelled(label: &str, value: &str) -> Result<usize> {
    let ids = list_labelled(label, value).await?;
    for id in &ids {
        remove(id).await?;
    }
    Ok(ids.len())
}

/// Ids of every container carrying `label=value`.
pub async fn list_labelled(label: &str, value: &str) -> Result<Vec<String>> {
    let out = output(
        podman().args([
            "ps",
            "--all",
            "--quiet",
            "--no-trunc",
            "--filter",
            &format!("label={label}={value}"),
        ]),
        "ps",
    )
    .await?;
    Ok(out.lines().map(str::to_owned).filter(|l| !l.is_empty()).collect())
}

/// (id, pod uid) of every container of `node`.
pub async fn list_node(node: &str) -> Result<Vec<(String, String)>> {
    let format = format!("{{{{.ID}}}} {{{{index .Labels \"{POD_UID_LABEL}\"}}}}");
    let out = output(
        podman().args([
            "ps",
            "--all",
            "--no-trunc",
            "--filter",
            &format!("label={NODE_LABEL}={node}"),
            "--format",
            &format,
        ]),
        "ps",
    )
    .await?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(id, uid)| (id.to_owned(), uid.trim().to_owned())))
        .collect())
}

/// `podman --version` -> "podman://4.3.1".
pub async fn runtime_version() -> String {
    match output(podman().arg("--version"), "--version").await {
        Ok(v) => format!("podman://{}", v.rsplit(' ').next().unwrap_or("4.3")),
        Err(_) => "podman://4.3".to_owned(),
    }
}

/// The soft limit of `resource`, capped: runc here refuses nproc above about 32k (the
/// sandbox lacks CAP_SYS_RESOURCE and has a lower hidden ceiling).
pub fn ulimit(resource: libc::__rlimit_resource_t, cap: u64) -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes the struct it is given.
    let ok = unsafe { libc::getrlimit(resource, &mut lim) } == 0;
    if !ok { cap.min(1024) } else { lim.rlim_cur.min(cap) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Capabilities, ResourceRequirements, SeccompProfile};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    #[test]
    fn image_names_are_qualified_to_the_local_store() {
        assert_eq!(qualify_image("consensus-node:0.1.0"), "localhost/consensus-node:0.1.0");
        assert_eq!(qualify_image("consensus-node"), "localhost/consensus-node:latest");
        assert_eq!(qualify_image("localhost/x:1"), "localhost/x:1");
        assert_eq!(qualify_image("team/x:1"), "localhost/team/x:1");
        assert_eq!(qualify_image("registry.example:5000/x"), "registry.example:5000/x:latest");
    }

    #[test]
    fn run_names_parse_back() {
        assert_eq!(
            parse_run_name("k8s_consensus-node_demo-0_kt_d428d051_3"),
            Some(("consensus-node".into(), 3))
        );
        assert_eq!(parse_run_name("k8s_c_p_ns_u"), None);
        assert_eq!(parse_run_name("other_c_p_ns_u_1"), None);
        assert_eq!(parse_run_name("k8s_c_p_ns_u_x"), None);
    }

    #[test]
    fn proc_stat_start_time() {
        let live =
            "17075 (consensus node) S 17064 17075 17075 0 -1 4194560 1 0 0 0 5 3 0 0 20 0 9 0 180129 1000 10";
        assert_eq!(parse_stat_start(live), Some(180129));
        let zombie = "17075 (x) Z 17064 17075 17075 0 -1 4194560 1 0 0 0 5 3 0 0 20 0 9 0 180129 1000 10";
        assert_eq!(parse_stat_start(zombie), None);
        let me = process_start_time(std::process::id() as i64);
        assert!(me.is_some(), "this test's own process is alive");
        assert_eq!(process_start_time(0), None);
    }

    #[test]
    fn quantities() {
        assert_eq!(quantity_bytes("512Mi"), Some(512 << 20));
        assert_eq!(quantity_bytes("1G"), Some(1_000_000_000));
        assert_eq!(quantity_bytes("1e3"), Some(1000));
        assert_eq!(quantity_bytes("1048576"), Some(1 << 20));
        assert_eq!(quantity_bytes("1.5Gi"), Some(3 << 29));
        assert_eq!(quantity_bytes("12Q"), None);
        assert_eq!(cpu_millis("500m"), Some(500));
        assert_eq!(cpu_millis("2"), Some(2000));
        assert_eq!(cpu_millis("0.25"), Some(250));
        assert_eq!(cpu_millis("0"), None);
    }

    #[test]
    fn image_user_check() {
        assert!(image_user_is_root("").unwrap());
        assert!(image_user_is_root("0:0").unwrap());
        assert!(image_user_is_root("root").unwrap());
        assert!(!image_user_is_root("65532:65532").unwrap());
        assert!(image_user_is_root("nobody").is_err());
    }

    fn member_container() -> Container {
        let limits = std::collections::BTreeMap::from([
            ("memory".to_owned(), Quantity("256Mi".into())),
            ("cpu".to_owned(), Quantity("500m".into())),
        ]);
        Container {
            name: "consensus-node".into(),
            resources: Some(ResourceRequirements { limits: Some(limits), ..ResourceRequirements::default() }),
            security_context: Some(SecurityContext {
                allow_privilege_escalation: Some(false),
                read_only_root_filesystem: Some(true),
                run_as_non_root: Some(true),
                capabilities: Some(Capabilities {
                    add: Some(vec!["CAP_NET_BIND_SERVICE".into()]),
                    drop: Some(vec!["ALL".into()]),
                }),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    localhost_profile: None,
                }),
                ..SecurityContext::default()
            }),
            ..Container::default()
        }
    }

    #[test]
    fn run_arguments_follow_the_security_context() {
        let pod_sc = PodSecurityContext {
            run_as_user: Some(65532),
            run_as_group: Some(65532),
            fs_group: Some(2000),
            supplemental_groups: Some(vec![3000]),
            ..PodSecurityContext::default()
        };
        let env = vec![("POD_NAME".to_owned(), "m-0".to_owned())];
        let mounts = vec![
            Mount { host: "/s/vol".into(), container: "/var/lib/consensus".into(), read_only: false },
            Mount { host: "/s/token".into(), container: "/var/run/secrets".into(), read_only: true },
        ];
        let input = RunInput {
            name: "k8s_c_p",
            image: "localhost/consensus-node:0.1.0",
            netns: "/run/netns/ccpod-abc",
            hostname: "m-0",
            labels: vec![(NODE_LABEL.into(), "node-1".into())],
            env: &env,
            command: Some(vec!["consensus-node".into()]),
            args: Some(vec!["run".into(), "--name=m-0".into()]),
            mounts: &mounts,
            pod_security: Some(&pod_sc),
            log_path: "/s/log",
            ulimit_nofile: 1024,
            ulimit_nproc: 512,
        };
        let a = run_args(&member_container(), &input);
        let has = |s: &str| a.iter().any(|x| x == s);
        assert!(has("--network=ns:/run/netns/ccpod-abc"));
        assert!(has("--user=65532:65532"));
        assert!(has("--group-add=2000") && has("--group-add=3000"));
        assert!(has("--read-only"));
        assert!(has("--cap-drop=ALL") && has("--cap-add=NET_BIND_SERVICE"));
        assert!(has("--security-opt=no-new-privileges"));
        assert!(!a.iter().any(|x| x.contains("seccomp=unconfined")), "RuntimeDefault keeps podman's profile");
        assert!(has("--volume=/s/vol:/var/lib/consensus"));
        assert!(has("--volume=/s/token:/var/run/secrets:ro"));
        assert!(has("--env=POD_NAME=m-0"));
        assert!(has("--label=consensus-dev.node=node-1"));
        assert!(has("--ulimit=nofile=1024:1024") && has("--ulimit=nproc=512:512"));
        assert!(has(r#"--entrypoint=["consensus-node"]"#));
        assert!(has("--memory=268435456") && has("--cpus=0.500"));
        let image_at = a.iter().position(|x| x == "localhost/consensus-node:0.1.0").unwrap();
        assert_eq!(&a[image_at + 1..], &["run".to_owned(), "--name=m-0".to_owned()]);
    }

    #[test]
    fn container_context_overrides_pod_context_and_unset_seccomp_is_unconfined() {
        let pod_sc = PodSecurityContext {
            run_as_user: Some(1),
            run_as_group: Some(1),
            ..PodSecurityContext::default()
        };
        let c = Container {
            name: "c".into(),
            security_context: Some(SecurityContext { run_as_user: Some(7), ..SecurityContext::default() }),
            ..Container::default()
        };
        let id = identity(Some(&pod_sc), c.security_context.as_ref());
        assert_eq!((id.uid, id.gid), (Some(7), Some(1)));
        let input = RunInput {
            name: "n",
            image: "i",
            netns: "/run/netns/x",
            hostname: "h",
            labels: vec![],
            env: &[],
            command: None,
            args: None,
            mounts: &[],
            pod_security: None,
            log_path: "/l",
            ulimit_nofile: 1,
            ulimit_nproc: 1,
        };
        let a = run_args(&c, &input);
        assert!(a.iter().any(|x| x == "--security-opt=seccomp=unconfined"));
        assert!(a.iter().any(|x| x == "--user=7"));
        assert!(!a.iter().any(|x| x.starts_with("--entrypoint")));
        assert_eq!(a.last().unwrap(), "i");
    }
}
