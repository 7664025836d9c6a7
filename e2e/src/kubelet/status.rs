//! Pod status from the kubelet's record of its containers: container statuses, the phase
//! (the kubelet's own getPhase rules), conditions with stable transition times, QoS class.

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus,
    HostIP, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::restart::Policy;

#[derive(Debug, Clone, PartialEq)]
pub struct Terminated {
    pub container_id: String,
    pub exit_code: i32,
    pub reason: String,
    pub message: Option<String>,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Run {
    Waiting { reason: String, message: Option<String> },
    Running { container_id: String, started_at: Timestamp },
    Terminated(Terminated),
}

/// What the kubelet knows about one container of a pod.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub name: String,
    pub image: String,
    pub image_id: String,
    pub state: Run,
    pub last: Option<Terminated>,
    pub restart_count: i32,
    /// Readiness probe verdict (true without a readiness probe once running).
    pub ready: bool,
    /// Startup probe passed (true without one once running).
    pub started: bool,
}

impl Record {
    pub fn new(name: &str, image: &str) -> Record {
        Record {
            name: name.to_owned(),
            image: image.to_owned(),
            image_id: String::new(),
            state: Run::Waiting { reason: "ContainerCreating".into(), message: None },
            last: None,
            restart_count: 0,
            ready: false,
            started: false,
        }
    }
}

/// Reason of a terminated container from its exit (as containerd/CRI report it).
pub fn exit_reason(exit_code: i32, oom_killed: bool) -> &'static str {
    if oom_killed {
        "OOMKilled"
    } else if exit_code == 0 {
        "Completed"
    } else {
        "Error"
    }
}

/// The kubelet's getPhase: init containers first, then the app containers' states.
pub fn phase(policy: Policy, init_done: bool, init: &[Record], containers: &[Record]) -> &'static str {
    if !init_done {
        let failed = init.iter().any(|r| matches!(&r.state, Run::Terminated(t) if t.exit_code != 0));
        return if failed && policy == Policy::Never { "Failed" } else { "Pending" };
    }
    let (mut running, mut waiting, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for r in containers {
        match &r.state {
            Run::Running { .. } => running += 1,
            Run::Terminated(t) => {
                stopped += 1;
                if t.exit_code == 0 {
                    succeeded += 1;
                }
            }
            Run::Waiting { .. } if r.last.is_some() => stopped += 1,
            Run::Waiting { .. } => waiting += 1,
        }
    }
    if waiting > 0 {
        "Pending"
    } else if running > 0 {
        "Running"
    } else if stopped > 0 {
        match policy {
            Policy::Always => "Running",
            _ if stopped == succeeded => "Succeeded",
            Policy::Never => "Failed",
            Policy::OnFailure => "Running",
        }
    } else {
        "Pending"
    }
}

fn time(t: &Option<Timestamp>) -> Option<Time> {
    t.map(Time)
}

fn terminated(t: &Terminated) -> ContainerStateTerminated {
    ContainerStateTerminated {
        container_id: (!t.container_id.is_empty()).then(|| format!("podman://{}", t.container_id)),
        exit_code: t.exit_code,
        reason: Some(t.reason.clone()),
        message: t.message.clone().filter(|m| !m.is_empty()),
        started_at: time(&t.started_at),
        finished_at: time(&t.finished_at),
        signal: None,
    }
}

pub fn container_status(r: &Record) -> ContainerStatus {
    let (state, id, running) = match &r.state {
        Run::Waiting { reason, message } => (
            ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.clone()),
                    message: message.clone(),
                }),
                ..ContainerState::default()
            },
            None,
            false,
        ),
        Run::Running { container_id, started_at } => (
            ContainerState {
                running: Some(ContainerStateRunning { started_at: Some(Time(*started_at)) }),
                ..ContainerState::default()
            },
            Some(container_id.clone()),
            true,
        ),
        Run::Terminated(t) => (
            ContainerState { terminated: Some(terminated(t)), ..ContainerState::default() },
            Some(t.container_id.clone()),
            false,
        ),
    };
    ContainerStatus {
        name: r.name.clone(),
        image: r.image.clone(),
        image_id: r.image_id.clone(),
        container_id: id.filter(|i| !i.is_empty()).map(|i| format!("podman://{i}")),
        state: Some(state),
        last_state: Some(r.last.as_ref().map_or_else(ContainerState::default, |t| ContainerState {
            terminated: Some(terminated(t)),
            ..ContainerState::default()
        })),
        ready: running && r.ready,
        started: Some(running && r.started),
        restart_count: r.restart_count,
        ..ContainerStatus::default()
    }
}

/// A condition that keeps its old transition time unless its status changed.
pub fn condition(
    previous: &[PodCondition],
    type_: &str,
    ok: bool,
    reason: Option<&str>,
    now: Timestamp,
) -> PodCondition {
    let status = if ok { "True" } else { "False" };
    let old = previous.iter().find(|c| c.type_ == type_);
    let transition = match old {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Some(Time(now)),
    };
    PodCondition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        last_transition_time: transition,
        reason: if ok { None } else { reason.map(str::to_owned) },
        message: None,
        last_probe_time: None,
        observed_generation: None,
    }
}

/// Guaranteed, Burstable or BestEffort from the containers' requests and limits.
pub fn qos_class(pod: &Pod) -> &'static str {
    let Some(spec) = &pod.spec else { return "BestEffort" };
    let mut any = false;
    let mut guaranteed = true;
    for c in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
        let req = c.resources.as_ref().and_then(|r| r.requests.clone()).unwrap_or_default();
        let lim = c.resources.as_ref().and_then(|r| r.limits.clone()).unwrap_or_default();
        any |= !req.is_empty() || !lim.is_empty();
        for res in ["cpu", "memory"] {
            let l = lim.get(res);
            let r = req.get(res).or(l);
            if l.is_none() || r != l {
                guaranteed = false;
            }
        }
    }
    if !any {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

pub struct Input<'a> {
    pub pod: &'a Pod,
    pub policy: Policy,
    pub pod_ip: Option<&'a str>,
    pub host_ip: &'a str,
    pub start_time: Timestamp,
    pub sandbox_ready: bool,
    pub init_done: bool,
    pub init: &'a [Record],
    pub containers: &'a [Record],
    pub now: Timestamp,
}

pub fn pod_status(i: &Input<'_>) -> PodStatus {
    let prev_status = i.pod.status.clone().unwrap_or_default();
    let prev = prev_status.conditions.clone().unwrap_or_default();
    let phase = phase(i.policy, i.init_done, i.init, i.containers);
    let all_ready = !i.containers.is_empty()
        && i.containers.iter().all(|r| matches!(r.state, Run::Running { .. }) && r.ready);
    let terminal = matches!(phase, "Succeeded" | "Failed");
    let containers_ready = all_ready && !terminal;
    let mut conditions = vec![
        condition(&prev, "PodReadyToStartContainers", i.sandbox_ready, None, i.now),
        condition(&prev, "Initialized", i.init_done, Some("ContainersNotInitialized"), i.now),
        condition(
            &prev,
            "Ready",
            containers_ready,
            Some(if terminal { "PodCompleted" } else { "ContainersNotReady" }),
            i.now,
        ),
        condition(
            &prev,
            "ContainersReady",
            containers_ready,
            Some(if terminal { "PodCompleted" } else { "ContainersNotReady" }),
            i.now,
        ),
        condition(&prev, "PodScheduled", true, None, i.now),
    ];
    // Conditions set by others (DisruptionTarget, readiness gates) are kept.
    for c in &prev {
        if !conditions.iter().any(|n| n.type_ == c.type_) {
            conditions.push(c.clone());
        }
    }
    PodStatus {
        phase: Some(phase.to_owned()),
        conditions: Some(conditions),
        host_ip: Some(i.host_ip.to_owned()),
        host_ips: Some(vec![HostIP { ip: i.host_ip.to_owned() }]),
        pod_ip: i.pod_ip.map(str::to_owned),
        pod_ips: i.pod_ip.map(|ip| vec![PodIP { ip: ip.to_owned() }]),
        start_time: Some(prev_status.start_time.clone().unwrap_or(Time(i.start_time))),
        qos_class: Some(prev_status.qos_class.clone().unwrap_or_else(|| qos_class(i.pod).to_owned())),
        init_container_statuses: (!i.init.is_empty()).then(|| i.init.iter().map(container_status).collect()),
        container_statuses: Some(i.containers.iter().map(container_status).collect()),
        ..PodStatus::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec, ResourceRequirements};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use std::collections::BTreeMap;

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    fn running(ready: bool) -> Record {
        Record {
            state: Run::Running { container_id: "abc".into(), started_at: now() },
            ready,
            started: true,
            ..Record::new("c", "img")
        }
    }

    fn exited(code: i32) -> Terminated {
        Terminated {
            container_id: "abc".into(),
            exit_code: code,
            reason: exit_reason(code, false).into(),
            message: None,
            started_at: Some(now()),
            finished_at: Some(now()),
        }
    }

    fn stopped(code: i32) -> Record {
        Record { state: Run::Terminated(exited(code)), ..Record::new("c", "img") }
    }

    fn backing_off(code: i32) -> Record {
        Record {
            state: Run::Waiting { reason: "CrashLoopBackOff".into(), message: None },
            last: Some(exited(code)),
            restart_count: 2,
            ..Record::new("c", "img")
        }
    }

    #[test]
    fn phases_follow_the_kubelet() {
        let waiting = Record::new("c", "img");
        assert_eq!(phase(Policy::Always, true, &[], std::slice::from_ref(&waiting)), "Pending");
        assert_eq!(phase(Policy::Always, true, &[], &[running(false)]), "Running");
        assert_eq!(phase(Policy::Always, true, &[], &[running(true), waiting]), "Pending");
        assert_eq!(phase(Policy::Always, true, &[], &[backing_off(1)]), "Running");
        assert_eq!(phase(Policy::Never, true, &[], &[stopped(0)]), "Succeeded");
        assert_eq!(phase(Policy::Never, true, &[], &[stopped(0), stopped(2)]), "Failed");
        assert_eq!(phase(Policy::OnFailure, true, &[], &[stopped(0)]), "Succeeded");
        assert_eq!(phase(Policy::OnFailure, true, &[], &[backing_off(1)]), "Running");
        assert_eq!(phase(Policy::Never, false, &[stopped(1)], &[]), "Failed");
        assert_eq!(phase(Policy::Always, false, &[stopped(1)], &[]), "Pending");
    }

    #[test]
    fn container_status_reports_state_last_state_and_readiness() {
        let mut r = backing_off(3);
        r.last.as_mut().unwrap().message = Some("lost data".into());
        let s = container_status(&r);
        assert_eq!(
            s.state.as_ref().unwrap().waiting.as_ref().unwrap().reason.as_deref(),
            Some("CrashLoopBackOff")
        );
        let last = s.last_state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!(
            (last.exit_code, last.message.as_deref(), last.reason.as_deref()),
            (3, Some("lost data"), Some("Error"))
        );
        assert_eq!(s.restart_count, 2);
        assert!(!s.ready);
        let s = container_status(&running(true));
        assert!(s.ready && s.started == Some(true));
        assert_eq!(s.container_id.as_deref(), Some("podman://abc"));
    }

    fn pod() -> Pod {
        Pod {
            metadata: ObjectMeta::default(),
            spec: Some(PodSpec {
                containers: vec![Container { name: "c".into(), ..Container::default() }],
                ..PodSpec::default()
            }),
            status: None,
        }
    }

    #[test]
    fn conditions_keep_transition_times_until_they_change() {
        let mut p = pod();
        let input = |p: &Pod, containers: &[Record], t: Timestamp| {
            pod_status(&Input {
                pod: p,
                policy: Policy::Always,
                pod_ip: Some("10.244.1.2"),
                host_ip: "10.244.0.1",
                start_time: now(),
                sandbox_ready: true,
                init_done: true,
                init: &[],
                containers,
                now: t,
            })
        };
        let first = input(&p, &[running(false)], now());
        let ready = |s: &PodStatus| {
            s.conditions.as_ref().unwrap().iter().find(|c| c.type_ == "Ready").unwrap().clone()
        };
        assert_eq!(ready(&first).status, "False");
        p.status = Some(first.clone());
        let later = now().checked_add(k8s_openapi::jiff::SignedDuration::from_secs(30)).unwrap();
        let same = input(&p, &[running(false)], later);
        assert_eq!(same, first, "nothing changed, so nothing to patch");
        let flipped = input(&p, &[running(true)], later);
        assert_eq!(ready(&flipped).status, "True");
        assert_eq!(ready(&flipped).last_transition_time, Some(Time(later)));
        assert_eq!(flipped.pod_ip.as_deref(), Some("10.244.1.2"));
        assert_eq!(flipped.qos_class.as_deref(), Some("BestEffort"));
    }

    #[test]
    fn qos_classes() {
        let mut p = pod();
        assert_eq!(qos_class(&p), "BestEffort");
        let q = |v: &str| Quantity(v.into());
        let both = BTreeMap::from([("cpu".to_owned(), q("1")), ("memory".to_owned(), q("1Gi"))]);
        p.spec.as_mut().unwrap().containers[0].resources = Some(ResourceRequirements {
            limits: Some(both.clone()),
            requests: Some(both),
            ..ResourceRequirements::default()
        });
        assert_eq!(qos_class(&p), "Guaranteed");
        p.spec.as_mut().unwrap().containers[0].resources = Some(ResourceRequirements {
            requests: Some(BTreeMap::from([("cpu".to_owned(), q("100m"))])),
            ..ResourceRequirements::default()
        });
        assert_eq!(qos_class(&p), "Burstable");
    }
}
