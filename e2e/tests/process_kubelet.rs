//! What a kubelet promises a pod, checked on a real cluster with the busybox test image
//! (`make test-images`; on the local cluster these are the process kubelet's promises, and
//! this file is its regression test): env and volume files from every source, exit codes and
//! termination messages, the refusal of an image that is not there, readiness from an HTTP
//! probe going both ways, and cluster DNS from inside a pod. Each scenario has a namespace of
//! its own; the image runs as 65532, so the pods write only into volumes.

use std::collections::BTreeSet;
use std::time::Duration;

use consensus_e2e::{
    TestNamespace, check_local_containment, image, kubectl, kubectl_json, kubectl_ok, wait_until,
};
use serde_json::Value;

fn busybox() -> String {
    image("consensus-e2e-busybox")
}

fn apply(ns: &str, manifests: &str) {
    kubectl_ok(&["-n", ns, "apply", "-f", "-"], Some(manifests));
}

fn pod(ns: &str, name: &str) -> Value {
    kubectl_json(&["-n", ns, "get", "pod", name])
}

/// The first container's status of a pod, once the kubelet has reported one.
fn container_status(pod: &Value) -> Option<&Value> {
    pod["status"]["containerStatuses"].get(0)
}

fn condition(pod: &Value, kind: &str) -> Option<String> {
    pod["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .and_then(|c| c["status"].as_str().map(str::to_owned))
}

/// The pod's events as (type, reason, message).
fn events(ns: &str, pod: &str) -> Vec<(String, String, String)> {
    let selector = format!("involvedObject.kind=Pod,involvedObject.name={pod}");
    let list = kubectl_json(&["-n", ns, "get", "events", "--field-selector", &selector]);
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    list["items"]
        .as_array()
        .map(|items| {
            items.iter().map(|e| (text(&e["type"]), text(&e["reason"]), text(&e["message"]))).collect()
        })
        .unwrap_or_default()
}

/// The lines `kubectl logs` prints for `target` (a pod, or `job/NAME`).
fn log_lines(ns: &str, target: &str) -> Vec<String> {
    kubectl_ok(&["-n", ns, "logs", target], None).lines().map(str::to_owned).collect()
}

/// The podman containers the local cluster's kubelets run for the pod with `uid`; None on
/// another cluster (kind), where the containers are not ours to list.
fn local_containers_of(uid: &str) -> Option<String> {
    std::env::var_os("LOCAL_CLUSTER_STATE")?;
    let out = std::process::Command::new("podman")
        .args(["ps", "-aq", "--filter", &format!("label=consensus-dev.pod-uid={uid}")])
        .output()
        .unwrap_or_else(|e| panic!("podman could not be started: {e}"));
    assert!(out.status.success(), "podman ps failed: {}", String::from_utf8_lossy(&out.stderr));
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The pod-side script of the first scenario. It is one of the container's `args`, so the
/// kubelet expands `$(NAME)` in it too: the script itself uses only `$NAME` and backquotes
/// (and no `$$`), and `$(...)` appears only in the argument that tests the expansion.
const READER_SCRIPT: &str = r#"
echo "env-greeting=$GREETING"
echo "env-password=$PASSWORD"
echo "env-pod-name=$POD_NAME"
echo "env-pod-ip=$POD_IP"
echo "env-combined=$COMBINED"
echo "arg=$1"
echo "secret-files=`ls /etc/secret | tr '\n' ' '`"
echo "secret-password=`cat /etc/secret/password`"
echo "secret-user=`cat /etc/secret/user`"
echo "config-files=`ls /etc/config | tr '\n' ' '`"
echo "config-colour=`cat /etc/config/nested/colour.txt`"
echo "config-colour-mode=`stat -c %a /etc/config/nested/colour.txt`"
echo "podinfo-name=`cat /etc/podinfo/name`"
echo "podinfo-namespace=`cat /etc/podinfo/namespace`"
echo "podinfo-app-label=`grep '^app=' /etc/podinfo/labels`"
echo "projected-token=`test -s /etc/projected/token && echo non-empty || echo empty`"
echo "projected-token-parts=`awk -F. '{print NF}' /etc/projected/token`"
echo "projected-ca=`head -n 1 /etc/projected/ca.crt`"
echo "projected-greeting=`cat /etc/projected/greeting`"
echo "write-root=`touch /probe 2>/dev/null && echo yes || echo no`"
echo "write-scratch=`touch /scratch/probe && echo yes || echo no`"
api="https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/apis/authentication.k8s.io/v1/selfsubjectreviews"
review='{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}'
token=`cat /etc/projected/token`
# The API server answers in indented JSON: one line of it here.
if answer=`wget -q -O - --header "Authorization: Bearer $token" --header 'Content-Type: application/json' --post-data "$review" "$api" 2>/dev/null`
then echo "review=`echo "$answer" | tr -d '\n'`"
else echo "review=failed"
fi
echo "review-with-a-forged-token=`wget -q -O - --header 'Authorization: Bearer forged' --header 'Content-Type: application/json' --post-data "$review" "$api" 2>/dev/null || echo refused`"
"#;

fn reader_manifests() -> String {
    let image = busybox();
    let script = serde_json::to_string(READER_SCRIPT).expect("a string serialises");
    format!(
        r#"apiVersion: v1
kind: ConfigMap
metadata: {{name: settings}}
data:
  greeting: hello-from-a-configmap
  colour: blue
  unlisted: not-in-the-volume
---
apiVersion: v1
kind: Secret
metadata: {{name: credentials}}
stringData:
  password: s3cret-from-a-secret
  user: e2e-user
---
apiVersion: batch/v1
kind: Job
metadata: {{name: reader}}
spec:
  backoffLimit: 0
  template:
    metadata:
      labels: {{app: reader}}
    spec:
      restartPolicy: Never
      enableServiceLinks: false
      securityContext: {{runAsNonRoot: true, runAsUser: 65532, runAsGroup: 65532, fsGroup: 65532}}
      containers:
        - name: reader
          image: {image}
          imagePullPolicy: IfNotPresent
          command: [/bin/sh, -c]
          args:
            - {script}
            - reader
            - "$(POD_NAME) greets with $(GREETING), $$(POD_NAME) is escaped, $(NOT_DEFINED) stays"
          env:
            - name: GREETING
              valueFrom:
                configMapKeyRef: {{name: settings, key: greeting}}
            - name: PASSWORD
              valueFrom:
                secretKeyRef: {{name: credentials, key: password}}
            - name: POD_NAME
              valueFrom:
                fieldRef: {{fieldPath: metadata.name}}
            - name: POD_IP
              valueFrom:
                fieldRef: {{fieldPath: status.podIP}}
            - name: COMBINED
              value: "$(GREETING)/$(PASSWORD)"
          securityContext:
            readOnlyRootFilesystem: true
            allowPrivilegeEscalation: false
          volumeMounts:
            - {{name: secret, mountPath: /etc/secret}}
            - {{name: config, mountPath: /etc/config}}
            - {{name: podinfo, mountPath: /etc/podinfo}}
            - {{name: projected, mountPath: /etc/projected}}
            - {{name: scratch, mountPath: /scratch}}
      volumes:
        - name: secret
          secret: {{secretName: credentials}}
        - name: config
          configMap:
            name: settings
            items:
              - {{key: colour, path: nested/colour.txt, mode: 0400}}
        - name: podinfo
          downwardAPI:
            items:
              - path: name
                fieldRef: {{fieldPath: metadata.name}}
              - path: namespace
                fieldRef: {{fieldPath: metadata.namespace}}
              - path: labels
                fieldRef: {{fieldPath: metadata.labels}}
        - name: projected
          projected:
            sources:
              - serviceAccountToken: {{path: token, expirationSeconds: 3600}}
              - configMap:
                  name: kube-root-ca.crt
                  items: [{{key: ca.crt, path: ca.crt}}]
              - configMap:
                  name: settings
                  items: [{{key: greeting, path: greeting}}]
        - name: scratch
          emptyDir: {{}}
"#
    )
}

fn job_condition(ns: &str, job: &str) -> Option<String> {
    let job = kubectl_json(&["-n", ns, "get", "job", job]);
    job["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| (c["type"] == "Complete" || c["type"] == "Failed") && c["status"] == "True")
        .and_then(|c| c["type"].as_str().map(str::to_owned))
}

#[test]
#[ignore = "needs a Kubernetes cluster with the busybox test image (make test-images): make e2e-local"]
fn a_job_reads_env_and_volume_files_from_every_source_and_calls_the_api_server_with_its_token() {
    let ns = TestNamespace::create("kubelet-reader");
    // The root CA ConfigMap is published into a new namespace by a controller: a pod started
    // before it exists would wait for it, which is not what this scenario is about.
    wait_until(Duration::from_secs(60), "kube-root-ca.crt in the namespace", || {
        kubectl(&["-n", &ns.0, "get", "configmap", "kube-root-ca.crt"], None).ok.then_some(())
    });
    apply(&ns.0, &reader_manifests());

    // The Job's one pod runs to the end and exits 0.
    let outcome =
        wait_until(Duration::from_secs(120), "the reader Job to finish", || job_condition(&ns.0, "reader"));
    let pods = kubectl_json(&["-n", &ns.0, "get", "pods", "-l", "job-name=reader"]);
    let reader = &pods["items"][0];
    assert_eq!(outcome, "Complete", "the Job failed; its pod: {reader:#}");
    let pod_ip = reader["status"]["podIP"].as_str().unwrap_or_default().to_owned();
    assert!(
        pod_ip.parse::<std::net::Ipv4Addr>().is_ok(),
        "the finished pod reports no IPv4 address: {pod_ip:?}"
    );
    let terminated = &reader["status"]["containerStatuses"][0]["state"]["terminated"];
    assert_eq!(terminated["exitCode"], 0, "{terminated:#}");
    assert_eq!(terminated["reason"], "Completed", "{terminated:#}");

    // What it printed, line by line: each value from the source the spec names.
    let mut lines = log_lines(&ns.0, "job/reader");
    let review = lines.iter().position(|l| l.starts_with("review=")).map(|i| lines.remove(i));
    let name = reader["metadata"]["name"].as_str().unwrap_or_default();
    let expected = [
        "env-greeting=hello-from-a-configmap".to_owned(),
        "env-password=s3cret-from-a-secret".to_owned(),
        format!("env-pod-name={name}"),
        format!("env-pod-ip={pod_ip}"),
        "env-combined=hello-from-a-configmap/s3cret-from-a-secret".to_owned(),
        format!(
            "arg={name} greets with hello-from-a-configmap, $(POD_NAME) is escaped, $(NOT_DEFINED) stays"
        ),
        "secret-files=password user ".to_owned(),
        "secret-password=s3cret-from-a-secret".to_owned(),
        "secret-user=e2e-user".to_owned(),
        // Only the listed item, under the path it names, with its own mode.
        "config-files=nested ".to_owned(),
        "config-colour=blue".to_owned(),
        // 0400 as the item says, group-readable for fsGroup as the kubelet makes it.
        "config-colour-mode=440".to_owned(),
        format!("podinfo-name={name}"),
        format!("podinfo-namespace={}", ns.0),
        r#"podinfo-app-label=app="reader""#.to_owned(),
        "projected-token=non-empty".to_owned(),
        "projected-token-parts=3".to_owned(),
        "projected-ca=-----BEGIN CERTIFICATE-----".to_owned(),
        "projected-greeting=hello-from-a-configmap".to_owned(),
        // readOnlyRootFilesystem (and uid 65532) keep the root closed; emptyDir is writable.
        "write-root=no".to_owned(),
        "write-scratch=yes".to_owned(),
        "review-with-a-forged-token=refused".to_owned(),
    ];
    assert_eq!(lines, expected, "the reader printed other lines");

    // The token is the pod's service account's, and the API server says so.
    let review = review.expect("the reader printed no review line");
    let review = review.trim_start_matches("review=");
    let review: Value = serde_json::from_str(review)
        .unwrap_or_else(|e| panic!("the API server's answer from inside the pod is no JSON ({e}): {review}"));
    assert_eq!(
        review["status"]["userInfo"]["username"],
        format!("system:serviceaccount:{}:default", ns.0),
        "the token is someone else's: {review:#}"
    );
    let bound_pod = &review["status"]["userInfo"]["extra"]["authentication.kubernetes.io/pod-name"];
    assert_eq!(
        bound_pod,
        &Value::Array(vec![Value::from(name)]),
        "the token is not bound to the pod: {review:#}"
    );
}

#[test]
#[ignore = "needs a Kubernetes cluster with the busybox test image (make test-images): make e2e-local"]
fn a_container_that_fails_reports_its_exit_code_and_termination_message() {
    let ns = TestNamespace::create("kubelet-exit");
    let image = busybox();
    apply(
        &ns.0,
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: failing}}
spec:
  restartPolicy: Never
  enableServiceLinks: false
  automountServiceAccountToken: false
  containers:
    - name: main
      image: {image}
      command: [/bin/sh, -c, "printf 'volume /data is full' > /dev/termination-log; echo exiting; exit 3"]
"#
        ),
    );

    let failed = wait_until(Duration::from_secs(90), "the pod to fail", || {
        let pod = pod(&ns.0, "failing");
        (pod["status"]["phase"] == "Failed").then_some(pod)
    });
    let status = container_status(&failed).expect("a failed pod without container status");
    let terminated = &status["state"]["terminated"];
    assert_eq!(terminated["exitCode"], 3, "{status:#}");
    assert_eq!(terminated["reason"], "Error", "{status:#}");
    assert_eq!(terminated["message"], "volume /data is full", "{status:#}");
    assert_eq!(status["restartCount"], 0, "restartPolicy Never restarted it: {status:#}");
    assert_eq!(status["ready"], false, "{status:#}");
    assert_eq!(log_lines(&ns.0, "pod/failing"), ["exiting"]);
}

#[test]
#[ignore = "needs a Kubernetes cluster: make e2e-local"]
fn an_image_that_is_not_in_the_store_is_refused_and_nothing_runs() {
    let ns = TestNamespace::create("kubelet-absent");
    apply(
        &ns.0,
        r#"apiVersion: v1
kind: Pod
metadata: {name: absent}
spec:
  automountServiceAccountToken: false
  containers:
    - name: main
      image: consensus-e2e-absent:1
      imagePullPolicy: Never
      command: [/bin/sh, -c, "echo this must never run"]
"#,
    );

    let waiting = wait_until(Duration::from_secs(90), "the container waiting on its image", || {
        let pod = pod(&ns.0, "absent");
        let status = container_status(&pod)?;
        (status["state"]["waiting"]["reason"] == "ErrImageNeverPull").then(|| (pod.clone(), status.clone()))
    });
    let (pod, status) = waiting;
    let message = status["state"]["waiting"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("consensus-e2e-absent:1"),
        "the waiting message does not name the image: {status:#}"
    );
    let warning = wait_until(Duration::from_secs(30), "a Warning event naming the image", || {
        events(&ns.0, "absent").into_iter().find(|(type_, reason, message)| {
            type_ == "Warning" && reason == "ErrImageNeverPull" && message.contains("consensus-e2e-absent:1")
        })
    });
    assert!(warning.2.contains("consensus-e2e-absent:1"));

    // Nothing ran: the pod is Pending, its container never started or restarted, and no
    // container exists for it (on the local cluster, where podman's store is the machine's).
    assert_eq!(pod["status"]["phase"], "Pending", "{pod:#}");
    assert_eq!(status["restartCount"], 0, "{status:#}");
    assert!(status["lastState"].as_object().is_none_or(|s| s.is_empty()), "it ran once: {status:#}");
    assert!(
        !events(&ns.0, "absent").iter().any(|(_, reason, _)| reason == "Started"),
        "a container was started"
    );
    if let Some(containers) = local_containers_of(pod["metadata"]["uid"].as_str().unwrap_or_default()) {
        assert_eq!(containers, "", "podman has containers for the refused pod");
    }
}

/// Asks the web pod, from this machine, to delete its readiness file (a CGI script of its
/// own), so the test decides when the pod turns NotReady rather than a timer racing the test.
fn ask_to_go_unready(ip: &str) -> Option<()> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect((ip, 8080)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    conn.write_all(b"GET /cgi-bin/unready HTTP/1.0\r\n\r\n").ok()?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer).ok()?;
    answer.contains("removed").then_some(())
}

#[test]
#[ignore = "needs a Kubernetes cluster with the busybox test image (make test-images): make e2e-local"]
fn an_http_readiness_probe_makes_a_pod_ready_and_not_ready_again_when_its_path_is_gone() {
    let ns = TestNamespace::create("kubelet-ready");
    let image = busybox();
    apply(
        &ns.0,
        &format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  clusterIP: None
  selector: {{app: web}}
  ports: [{{name: http, port: 8080}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  labels: {{app: web}}
spec:
  enableServiceLinks: false
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 2
  containers:
    - name: httpd
      image: {image}
      command:
        - /bin/sh
        - -c
        - >-
          mkdir -p /www/cgi-bin &&
          printf '#!/bin/sh\nrm -f /www/ready.txt\nprintf "Content-Type: text/plain\\r\\n\\r\\nremoved\\n"\n' > /www/cgi-bin/unready &&
          chmod +x /www/cgi-bin/unready && echo ok > /www/ready.txt && exec httpd -f -p 8080 -h /www
      ports: [{{name: http, containerPort: 8080}}]
      readinessProbe:
        httpGet: {{path: /ready.txt, port: http}}
        periodSeconds: 1
        failureThreshold: 1
      volumeMounts: [{{name: www, mountPath: /www}}]
  volumes:
    - name: www
      emptyDir: {{}}
"#
        ),
    );

    // Ready once the probe fetches the file: the pod, and its address in the Service's slice.
    let ready = wait_until(Duration::from_secs(90), "the web pod Ready", || {
        let pod = pod(&ns.0, "web");
        (condition(&pod, "Ready").as_deref() == Some("True")).then_some(pod)
    });
    let status = container_status(&ready).expect("a ready pod without container status");
    assert!(status["state"]["running"].is_object(), "{status:#}");
    let ip = ready["status"]["podIP"].as_str().unwrap_or_default().to_owned();
    let slice_says = |want: bool| {
        let slices =
            kubectl_json(&["-n", &ns.0, "get", "endpointslices", "-l", "kubernetes.io/service-name=web"]);
        slices["items"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["endpoints"].as_array().into_iter().flatten())
            .any(|e| {
                e["addresses"].get(0).and_then(Value::as_str) == Some(ip.as_str())
                    && e["conditions"]["ready"] == want
            })
    };
    wait_until(Duration::from_secs(30), "the EndpointSlice to list the pod ready", || {
        slice_says(true).then_some(())
    });

    // The file goes: the probe gets 404 and the pod is NotReady again while its container
    // keeps running, with no restart, and the slice follows.
    wait_until(Duration::from_secs(30), "the web pod to remove its readiness file", || {
        ask_to_go_unready(&ip)
    });
    let not_ready = wait_until(Duration::from_secs(60), "the web pod NotReady", || {
        let pod = pod(&ns.0, "web");
        (condition(&pod, "Ready").as_deref() == Some("False")).then_some(pod)
    });
    assert_eq!(condition(&not_ready, "ContainersReady").as_deref(), Some("False"), "{not_ready:#}");
    let status = container_status(&not_ready).expect("a pod without container status");
    assert!(status["state"]["running"].is_object(), "the container stopped instead: {status:#}");
    assert_eq!(status["restartCount"], 0, "{status:#}");
    assert_eq!(status["ready"], false, "{status:#}");
    wait_until(Duration::from_secs(30), "the EndpointSlice to list the pod not ready", || {
        slice_says(false).then_some(())
    });
    wait_until(Duration::from_secs(30), "an Unhealthy event", || {
        events(&ns.0, "web").into_iter().find(|(type_, reason, message)| {
            type_ == "Warning" && reason == "Unhealthy" && message.starts_with("Readiness probe failed")
        })
    });
}

/// The addresses an `nslookup` printed for its answer (after the server's own lines).
fn answered_addresses(output: &str) -> BTreeSet<String> {
    output
        .split_once("Name:")
        .map(|(_, answer)| {
            answer
                .lines()
                .filter_map(|l| l.trim().strip_prefix("Address:"))
                .map(|a| a.trim().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The sections the DNS client pod printed, by the name after its `== ` marker lines.
fn sections(lines: &[String]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in lines {
        if let Some(name) = line.strip_prefix("== ") {
            out.push((name.to_owned(), String::new()));
        } else if let Some((_, text)) = out.last_mut() {
            text.push_str(line);
            text.push('\n');
        }
    }
    out
}

/// What `kubernetes.default` must resolve to: on our local cluster, which has no kube-proxy,
/// DNS answers a ClusterIP Service with its endpoints (the API server's address); elsewhere
/// with the ClusterIP.
fn kubernetes_service_addresses() -> BTreeSet<String> {
    if std::env::var_os("LOCAL_CLUSTER_STATE").is_some() {
        let slices = kubectl_json(&[
            "-n",
            "default",
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=kubernetes",
        ]);
        slices["items"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["endpoints"].as_array().into_iter().flatten())
            .flat_map(|e| e["addresses"].as_array().into_iter().flatten())
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect()
    } else {
        let ip = kubectl_ok(
            &["-n", "default", "get", "service", "kubernetes", "-o", "jsonpath={.spec.clusterIP}"],
            None,
        );
        BTreeSet::from([ip])
    }
}

#[test]
#[ignore = "needs a Kubernetes cluster with the busybox test image (make test-images): make e2e-local"]
fn a_pod_resolves_the_api_service_and_a_headless_member_through_cluster_dns() {
    let ns = TestNamespace::create("kubelet-dns");
    let image = busybox();
    apply(
        &ns.0,
        &format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: peers}}
spec:
  clusterIP: None
  selector: {{app: peer}}
  ports: [{{name: http, port: 8080}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: peer
  labels: {{app: peer}}
spec:
  hostname: peer-0
  subdomain: peers
  enableServiceLinks: false
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers:
    - name: main
      image: {image}
      command: [/bin/sh, -c, "trap 'exit 0' TERM; while true; do sleep 1; done"]
"#
        ),
    );
    let peer = wait_until(Duration::from_secs(90), "the peer pod Ready", || {
        let pod = pod(&ns.0, "peer");
        (condition(&pod, "Ready").as_deref() == Some("True")).then_some(pod)
    });
    let peer_ip = peer["status"]["podIP"].as_str().unwrap_or_default().to_owned();
    check_local_containment();

    // The client looks up the short names as a resolver does, trying the domains of its
    // resolv.conf's search line in turn (busybox's nslookup searches only for names without a
    // dot, and its static glibc cannot resolve in an image without shared libraries), until
    // one answers: DNS learns of the member from the EndpointSlice shortly after the pod is
    // Ready. A name in the namespace's domain that is no Service is asked once, in full.
    let domain = format!("{}.svc.cluster.local", ns.0);
    let script = format!(
        r#"echo "== resolv.conf"; cat /etc/resolv.conf
resolve() {{
  for domain in `sed -n 's/^search //p' /etc/resolv.conf`; do
    if out=`nslookup -type=a $1.$domain 2>&1`; then echo "$out"; return 0; fi
  done
  return 1
}}
for name in kubernetes.default peer-0.peers peers; do
  tries=0
  until out=`resolve $name` || [ $tries -ge 30 ]; do tries=`expr $tries + 1`; sleep 1; done
  echo "== $name"; echo "$out"
done
echo "== no-such-service.{domain}"; nslookup -type=a no-such-service.{domain} 2>&1; echo "exit=$?""#
    );
    let script = serde_json::to_string(&script).expect("a string serialises");
    apply(
        &ns.0,
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: client}}
spec:
  restartPolicy: Never
  enableServiceLinks: false
  automountServiceAccountToken: false
  containers:
    - name: main
      image: {image}
      command: [/bin/sh, -c, {script}]
"#
        ),
    );
    let client = wait_until(Duration::from_secs(120), "the client pod to finish", || {
        let pod = pod(&ns.0, "client");
        matches!(pod["status"]["phase"].as_str(), Some("Succeeded" | "Failed")).then_some(pod)
    });
    assert_eq!(client["status"]["phase"], "Succeeded", "{client:#}");
    let lines = log_lines(&ns.0, "pod/client");
    let printed = sections(&lines);
    let section = |name: &str| {
        printed
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, text)| text.clone())
            .unwrap_or_else(|| panic!("the client printed nothing for {name}: {lines:#?}"))
    };

    // The pod's resolver searches its own namespace first, with the cluster's ndots.
    let resolv = section("resolv.conf");
    let search = format!("search {}.svc.cluster.local svc.cluster.local cluster.local", ns.0);
    assert!(resolv.lines().any(|l| l.starts_with(&search)), "no `{search}` in:\n{resolv}");
    assert!(resolv.lines().any(|l| l.starts_with("options") && l.contains("ndots:5")), "{resolv}");

    // Each short name resolves through the search list to what it stands for.
    let api = section("kubernetes.default");
    assert!(api.contains("Name:\tkubernetes.default.svc.cluster.local"), "kubernetes.default:\n{api}");
    assert_eq!(answered_addresses(&api), kubernetes_service_addresses(), "kubernetes.default:\n{api}");
    let member = section("peer-0.peers");
    assert!(member.contains(&format!("Name:\tpeer-0.peers.{domain}")), "peer-0.peers:\n{member}");
    assert_eq!(answered_addresses(&member), BTreeSet::from([peer_ip.clone()]), "the member name:\n{member}");
    let headless = section("peers");
    assert!(headless.contains(&format!("Name:\tpeers.{domain}")), "peers:\n{headless}");
    assert_eq!(answered_addresses(&headless), BTreeSet::from([peer_ip]), "the headless Service:\n{headless}");

    // A name that is no Service is not there: NXDOMAIN, and nslookup says it failed.
    let absent = section(&format!("no-such-service.{domain}"));
    assert!(answered_addresses(&absent).is_empty(), "a name that is no Service resolved:\n{absent}");
    assert!(absent.contains("NXDOMAIN"), "no NXDOMAIN for a name that is no Service:\n{absent}");
    assert!(!absent.contains("exit=0"), "nslookup found a name that is no Service:\n{absent}");
}
