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
    use musubi_controller::kubernetes::{KubeSource, KubeSourceConfig};
    let source = KubeSource::start(KubeSourceConfig {
        client: kube.clone(),
        trust_domain: "cluster.local".into(),
        cluster_domain: "cluster.local".into(),
        mtls: musubi_controller::model::Mtls::Strict,
        initial_sync_timeout: Duration::from_secs(30),
    })
    .await;
    let running = musubi_controller::start(musubi_controller::ControllerConfig {
        source,
        bundle: identity.ca.bundle.clone(),
        store: identity.svid("musubi", "musubi-controller").await,
        listener: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    })
    .unwrap();
    (running, identity.id("musubi", "musubi-controller"))
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
