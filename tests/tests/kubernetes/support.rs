//! Small helpers over the admin client: namespaces, service accounts, tokens.

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ObjectMeta, PostParams};
use musubi_proto::discovery::v1::ServiceUpdate;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tonic::Streaming;

/// A namespace with a unique name starting with `prefix`, with these annotations and labels.
pub async fn namespace(
    client: &kube::Client,
    prefix: &str,
    annotations: &[(&str, &str)],
    labels: &[(&str, &str)],
) -> String {
    let name = format!("{prefix}-{}", fastrand_suffix());
    let map = |kv: &[(&str, &str)]| -> Option<BTreeMap<String, String>> {
        Some(
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    };
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            annotations: map(annotations),
            labels: map(labels),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    name
}

fn fastrand_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{:x}{}", nanos & 0xffff, N.fetch_add(1, Ordering::Relaxed))
}

pub async fn service_account(client: &kube::Client, ns: &str, name: &str) {
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
}

/// A real TokenRequest token for `ns/sa` with `audience`.
pub async fn token(client: &kube::Client, ns: &str, sa: &str, audience: &str) -> String {
    let req = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![audience.into()]),
            expiration_seconds: Some(600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let api = Api::<ServiceAccount>::namespaced(client.clone(), ns);
    let answer: TokenRequest = api
        .create_token_request(sa, &PostParams::default(), &req)
        .await
        .unwrap();
    answer.status.unwrap().token.unwrap()
}

pub fn meshed_pod(name: &str, sa: &str, ip: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "name": name, "labels": { "app": "api" } },
        "spec": {
            "serviceAccountName": sa,
            "initContainers": [{ "name": "musubi-proxy", "image": "proxy", "restartPolicy": "Always" }],
            "containers": [{ "name": "app", "image": "api", "ports": [{ "containerPort": 8080 }] }],
        },
        "status": { "podIP": ip },
    }))
    .unwrap()
}

pub fn slice(ns: &str, endpoints: &[(&str, &str)]) -> EndpointSlice {
    let eps: Vec<_> = endpoints
        .iter()
        .map(|(ip, pod)| {
            json!({
                "addresses": [ip],
                "conditions": { "ready": true },
                "targetRef": { "kind": "Pod", "namespace": ns, "name": pod },
            })
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": { "name": "api-1", "labels": { "kubernetes.io/service-name": "api" } },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
        "endpoints": eps,
    }))
    .unwrap()
}

pub async fn next_matching<T>(
    stream: &mut Streaming<T>,
    what: &str,
    within: Duration,
    mut pred: impl FnMut(&T) -> bool,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, stream.message())
            .await
            .unwrap_or_else(|_| panic!("no {what} within {within:?}"))
            .unwrap()
            .unwrap();
        if pred(&msg) {
            return msg;
        }
    }
}

pub fn endpoint_summary(u: &ServiceUpdate) -> Vec<(String, String)> {
    u.service
        .as_ref()
        .map(|s| {
            s.endpoints
                .iter()
                .map(|e| (e.address.clone(), e.identity.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// The controller with a Kubernetes source over `kube`, serving on 127.0.0.1 with an SVID from
/// `identity`; returns it and the identity clients must expect.
pub async fn start_controller(
    kube: &kube::Client,
    identity: &musubi_tests::Identity,
) -> (
    musubi_controller::RunningController,
    musubi_identity::SpiffeId,
) {
    start_controller_with(kube, identity, Duration::from_secs(30)).await
}

/// Like [`start_controller`], serving discovery after at most `initial_sync` without the core
/// lists.
pub async fn start_controller_with(
    kube: &kube::Client,
    identity: &musubi_tests::Identity,
    initial_sync: Duration,
) -> (
    musubi_controller::RunningController,
    musubi_identity::SpiffeId,
) {
    use musubi_controller::kubernetes::{KubeSource, KubeSourceConfig};
    let source = KubeSource::start(KubeSourceConfig {
        client: kube.clone(),
        trust_domain: "cluster.local".into(),
        cluster_domain: "cluster.local".into(),
        mtls: musubi_controller::model::Mtls::Strict,
        initial_sync_timeout: initial_sync,
    })
    .await;
    let running = musubi_controller::start(musubi_controller::ControllerConfig {
        source,
        bundle: identity.ca.bundle.clone(),
        store: identity.svid("musubi", "musubi-controller").await,
        listener: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        streams: Default::default(),
    })
    .unwrap();
    (running, identity.id("musubi", "musubi-controller"))
}

/// A policy stream, as the workload `ns/sa` (an SVID from `identity`).
pub async fn policy_watch(
    identity: &musubi_tests::Identity,
    controller: &musubi_controller::RunningController,
    controller_id: &musubi_identity::SpiffeId,
    (ns, sa): (&str, &str),
) -> Streaming<musubi_proto::policy::v1::InboundPolicy> {
    use musubi_proto::policy::v1::{PolicyRequest, policy_client::PolicyClient};
    let channel = musubi_proxy::control::channel(
        &controller.addr.to_string(),
        &identity.ca.bundle,
        identity.svid(ns, sa).await,
        controller_id.clone(),
    )
    .unwrap();
    PolicyClient::new(channel)
        .watch(PolicyRequest { ports: vec![8080] })
        .await
        .unwrap()
        .into_inner()
}

/// The chart's CRD files (`meshtls`, `authorizationpolicies`).
pub fn crd_file(plural: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/musubi/crds")
        .join(format!("{plural}.yaml"))
}

/// Applies CRD files (or YAML text through stdin, when `text` is given) and waits until the API
/// server serves them.
pub fn apply_crds(
    api: &musubi_tests::apiserver::ApiServer,
    files: &[std::path::PathBuf],
    text: Option<&str>,
    names: &[&str],
) {
    let mut apply = api.tool("kubectl");
    apply.args(["apply", "--server-side", "--force-conflicts"]);
    let out = match text {
        Some(t) => {
            apply.args(["-f", "-"]);
            with_stdin(apply, t)
        }
        None => {
            for f in files {
                apply.arg("-f").arg(f);
            }
            apply.output().unwrap()
        }
    };
    ok(&out, "kubectl apply (CRDs)");
    let mut wait = api.tool("kubectl");
    wait.args(["wait", "--for=condition=Established", "--timeout=60s"]);
    for n in names {
        wait.arg(format!("crd/{n}.policy.musubi.io"));
    }
    ok(&wait.output().unwrap(), "kubectl wait (CRDs)");
}

/// Creates one of Musubi's policy objects in `ns`.
pub async fn create_policy(
    kube: &kube::Client,
    ns: &str,
    kind: &str,
    name: &str,
    spec: serde_json::Value,
) -> Result<kube::api::DynamicObject, kube::Error> {
    let plural = plural(kind);
    let ar = musubi_controller::kubernetes::crd_resource(kind, plural);
    let mut obj = kube::api::DynamicObject::new(name, &ar).within(ns);
    obj.data = json!({ "spec": spec });
    Api::<kube::api::DynamicObject>::namespaced_with(kube.clone(), ns, &ar)
        .create(&PostParams::default(), &obj)
        .await
}

/// The plural of one of Musubi's policy kinds.
fn plural(kind: &str) -> &'static str {
    match kind {
        "MeshTLS" => "meshtls",
        "FaultInjection" => "faultinjections",
        "RoutePolicy" => "routepolicies",
        _ => "authorizationpolicies",
    }
}

/// The object's `Accepted` condition, once it says `status` for its current generation.
pub async fn accepted_condition(
    kube: &kube::Client,
    ns: &str,
    kind: &str,
    name: &str,
    status: &str,
) -> serde_json::Value {
    let plural = plural(kind);
    let ar = musubi_controller::kubernetes::crd_resource(kind, plural);
    let api = Api::<kube::api::DynamicObject>::namespaced_with(kube.clone(), ns, &ar);
    musubi_tests::eventually(
        &format!("{kind} {ns}/{name} to say Accepted={status}"),
        Duration::from_secs(20),
        || {
            let api = api.clone();
            async move {
                let o = api.get(name).await.ok()?;
                let generation = o.metadata.generation;
                let c = o.data["status"]["conditions"]
                    .as_array()?
                    .iter()
                    .find(|c| c["type"] == "Accepted")?
                    .clone();
                (c["status"] == status && c["observedGeneration"].as_i64() == generation)
                    .then_some(c)
            }
        },
    )
    .await
}

/// Runs `cmd` with `input` on its stdin; returns what it said.
pub fn with_stdin(mut cmd: std::process::Command, input: &str) -> std::process::Output {
    use std::io::Write as _;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// A discovery stream for `target`, as the workload `ns/sa` (an SVID from `identity`).
pub async fn discovery_watch(
    identity: &musubi_tests::Identity,
    controller: &musubi_controller::RunningController,
    controller_id: &musubi_identity::SpiffeId,
    (ns, sa): (&str, &str),
    target: String,
) -> Streaming<ServiceUpdate> {
    use musubi_proto::discovery::v1::{WatchRequest, discovery_client::DiscoveryClient};
    let channel = musubi_proxy::control::channel(
        &controller.addr.to_string(),
        &identity.ca.bundle,
        identity.svid(ns, sa).await,
        controller_id.clone(),
    )
    .unwrap();
    DiscoveryClient::new(channel)
        .watch(WatchRequest {
            target,
            context_namespace: ns.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// What the endpoint controller would write for Service `api` (port 80 → 8080, appProtocol
/// http) over two meshed pods api-a (10.1.0.1) and api-b (10.1.0.2) running as `api`: the
/// pods, the Service, and EndpointSlice `api-1` with the `ready` ones of them. Returns the
/// Service's cluster IP.
pub async fn api_service(kube: &kube::Client, ns: &str, ready: &[(&str, &str)]) -> String {
    use k8s_openapi::api::core::v1::Service;
    let pods = Api::<Pod>::namespaced(kube.clone(), ns);
    for (name, ip) in [("api-a", "10.1.0.1"), ("api-b", "10.1.0.2")] {
        pods.create(&PostParams::default(), &meshed_pod(name, "api", ip))
            .await
            .unwrap();
    }
    let svc: Service = serde_json::from_value(json!({
        "metadata": { "name": "api" },
        "spec": { "selector": { "app": "api" }, "ports": [{ "name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http" }] },
    }))
    .unwrap();
    let svc = Api::<Service>::namespaced(kube.clone(), ns)
        .create(&PostParams::default(), &svc)
        .await
        .unwrap();
    Api::<EndpointSlice>::namespaced(kube.clone(), ns)
        .create(&PostParams::default(), &slice(ns, ready))
        .await
        .unwrap();
    svc.spec.and_then(|s| s.cluster_ip).unwrap()
}

/// Asserts that a tool succeeded (showing its stderr otherwise); returns its stdout.
pub fn ok(out: &std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A client with exactly the controller's RBAC from the chart: its ClusterRole (rendered by
/// Helm) under a name of its own, bound to a user of its own.
pub async fn chart_controller_client(
    api: &musubi_tests::apiserver::ApiServer,
    kube: &kube::Client,
    user: &str,
) -> kube::Client {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/musubi");
    let mut helm = api.tool("helm");
    helm.args(["template", "musubi"])
        .arg(&chart)
        .args([
            "--namespace",
            "musubi-system",
            "--show-only",
            "templates/controller.yaml",
        ])
        .args([
            "--set",
            "identity.trustAnchorsPEM=-----BEGIN CERTIFICATE----- x",
            "--set",
            "identity.issuer.crtPEM=x",
        ])
        .args([
            "--set",
            "identity.issuer.keyPEM=x",
            "--set",
            "injector.tls.crtPEM=x",
        ])
        .args([
            "--set",
            "injector.tls.keyPEM=x",
            "--set",
            "injector.tls.caPEM=x",
        ]);
    let rendered = ok(&helm.output().unwrap(), "helm template (controller)");
    let mut role: ClusterRole = rendered
        .split("\n---")
        .filter_map(|doc| serde_yaml::from_str::<serde_json::Value>(doc).ok())
        .find(|v| v["kind"] == "ClusterRole")
        .map(|v| serde_json::from_value(v).unwrap())
        .expect("the chart has the controller's ClusterRole");
    let name = format!("musubi-controller-as-{user}");
    role.metadata = ObjectMeta {
        name: Some(name.clone()),
        ..Default::default()
    };
    Api::<ClusterRole>::all(kube.clone())
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": { "name": name },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name },
        "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user }],
    }))
    .unwrap();
    Api::<ClusterRoleBinding>::all(kube.clone())
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let kc = kube::config::Kubeconfig::read_from(api.kubeconfig_for(user, &[])).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(cfg).unwrap()
}
