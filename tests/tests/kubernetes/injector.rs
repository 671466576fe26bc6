//! The injector as the API server's mutating webhook: pods created through the API come back
//! stored with the proxy; opted-out pods are untouched; garbage sent to the webhook is
//! answered and the webhook keeps serving; `musubi inject` output passes server-side validation.

use crate::support;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use musubi_injector::InjectConfig;
use musubi_injector::server::{ApiNamespaces, Webhook};
use musubi_tests::apiserver::ApiServer;
use rcgen::{CertificateParams, KeyPair, SanType};
use serde_json::json;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct RunningWebhook {
    addr: std::net::SocketAddr,
    ca_pem: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RunningWebhook {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn anchors() -> String {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.self_signed(&key).unwrap().pem()
}

/// The webhook in-process on 127.0.0.1 with a serving certificate from a fresh CA.
async fn start_webhook(kube: &kube::Client) -> RunningWebhook {
    musubi_identity::crypto::install_default();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca, &ca_key);
    let key = KeyPair::generate().unwrap();
    let mut sp = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    sp.subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let serving = sp.signed_by(&key, &issuer).unwrap();
    let tls = musubi_identity::tls::webhook_server_config(
        serving.pem().as_bytes(),
        key.serialize_pem().as_bytes(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hook = Webhook::new(
        InjectConfig::with_anchors(anchors()),
        Arc::new(ApiNamespaces(kube.clone())),
    );
    let task = tokio::spawn(musubi_injector::server::serve(listener, tls, hook));
    RunningWebhook {
        addr,
        ca_pem: ca_cert.pem(),
        task,
    }
}

/// Registers the webhook for pods of namespaces labelled `musubi-test-webhook=<id>` only, so
/// other tests sharing the API server are not routed to it.
async fn register(kube: &kube::Client, hook: &RunningWebhook, id: &str) {
    use base64::Engine as _;
    let cfg: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": format!("musubi-injector-{id}") },
        "webhooks": [{
            "name": "injector.musubi.io",
            "clientConfig": {
                "url": format!("https://{}/inject", hook.addr),
                "caBundle": base64::engine::general_purpose::STANDARD.encode(&hook.ca_pem),
            },
            "rules": [{ "operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"] }],
            "namespaceSelector": { "matchLabels": { "musubi-test-webhook": id } },
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 10,
        }],
    }))
    .unwrap();
    Api::<MutatingWebhookConfiguration>::all(kube.clone())
        .create(&PostParams::default(), &cfg)
        .await
        .unwrap();
}

fn deployment(name: &str, annotations: serde_json::Value) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": name },
        "spec": {
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name }, "annotations": annotations },
                "spec": {
                    "serviceAccountName": "web",
                    "containers": [{ "name": "app", "image": "registry.example/web:1", "ports": [{ "containerPort": 8080 }] }],
                },
            },
        },
    }))
    .unwrap()
}

/// Stores the Deployment, then creates one pod from its template the way the ReplicaSet
/// controller would (there is no controller-manager here), and returns the stored pod.
async fn create_deployment_pod(kube: &kube::Client, ns: &str, d: &Deployment) -> Pod {
    let deployments = Api::<Deployment>::namespaced(kube.clone(), ns);
    let d = deployments.create(&PostParams::default(), d).await.unwrap();
    let template = d.spec.template;
    let mut meta = template.metadata.unwrap_or_default();
    meta.generate_name = Some(format!("{}-", d.metadata.name.unwrap()));
    let pod = Pod {
        metadata: meta,
        spec: template.spec,
        ..Default::default()
    };
    let created = Api::<Pod>::namespaced(kube.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
    // Read it back: what is stored is what a kubelet would run.
    Api::<Pod>::namespaced(kube.clone(), ns)
        .get(created.metadata.name.as_deref().unwrap())
        .await
        .unwrap()
}

fn init_names(pod: &Pod) -> Vec<String> {
    pod.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .map(|c| c.iter().map(|c| c.name.clone()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn webhook_injects_annotated_namespaces_and_leaves_the_rest() {
    let api = musubi_tests::api_server_or_skip!();
    let kube = api.client().await;
    let hook = start_webhook(&kube).await;
    let id = "inject-a";
    register(&kube, &hook, id).await;
    let meshed = support::namespace(
        &kube,
        "meshed",
        &[("musubi.io/inject", "enabled")],
        &[("musubi-test-webhook", id)],
    )
    .await;
    let plain = support::namespace(&kube, "plain", &[], &[("musubi-test-webhook", id)]).await;
    for ns in [&meshed, &plain] {
        support::service_account(&kube, ns, "web").await;
    }

    let pod = create_deployment_pod(&kube, &meshed, &deployment("web", json!({}))).await;
    assert_eq!(init_names(&pod), ["musubi-init", "musubi-proxy"]);
    let spec = pod.spec.as_ref().unwrap();
    let proxy = &spec.init_containers.as_ref().unwrap()[1];
    assert_eq!(proxy.restart_policy.as_deref(), Some("Always"));
    assert_eq!(
        proxy.security_context.as_ref().unwrap().run_as_user,
        Some(2102)
    );
    let token_volume = spec
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "musubi-token")
        .expect("token volume stored");
    let sat = token_volume
        .projected
        .as_ref()
        .unwrap()
        .sources
        .as_ref()
        .unwrap()[0]
        .service_account_token
        .as_ref()
        .unwrap();
    assert_eq!(sat.audience.as_deref(), Some("identity.musubi.io"));
    // The ServiceAccount admission plugin's own volume is still there: the patch appended.
    assert!(spec.volumes.as_ref().unwrap().len() >= 2);
    let annotations = pod.metadata.annotations.as_ref().unwrap();
    assert!(annotations.contains_key("musubi.io/proxy-version"));
    assert_eq!(
        pod.metadata.labels.as_ref().unwrap()["musubi.io/control-plane-ns"],
        "musubi-system"
    );

    let opted_out = create_deployment_pod(
        &kube,
        &meshed,
        &deployment("batch", json!({ "musubi.io/inject": "disabled" })),
    )
    .await;
    assert!(init_names(&opted_out).is_empty(), "opt-out pod untouched");

    let unannotated = create_deployment_pod(&kube, &plain, &deployment("web", json!({}))).await;
    assert!(
        init_names(&unannotated).is_empty(),
        "namespace without the annotation untouched"
    );

    // A pod's own opt-in works in a namespace that did not opt in.
    let opted_in = create_deployment_pod(
        &kube,
        &plain,
        &deployment("api", json!({ "musubi.io/inject": "enabled" })),
    )
    .await;
    assert_eq!(init_names(&opted_in), ["musubi-init", "musubi-proxy"]);

    // A bad tuning annotation is refused at creation, naming the annotation.
    let bad = create_pod_err(
        &kube,
        &meshed,
        json!({ "musubi.io/skip-inbound-ports": "http" }),
    )
    .await;
    assert!(bad.contains("musubi.io/skip-inbound-ports"), "{bad}");
}

async fn create_pod_err(kube: &kube::Client, ns: &str, annotations: serde_json::Value) -> String {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "generateName": "bad-", "annotations": annotations },
        "spec": { "serviceAccountName": "web", "containers": [{ "name": "a", "image": "a" }] },
    }))
    .unwrap();
    Api::<Pod>::namespaced(kube.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap_err()
        .to_string()
}

/// Sends `body` to the webhook over TLS (trusting its CA) and returns the raw HTTP response.
async fn post_raw(hook: &RunningWebhook, body: &[u8]) -> String {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::pem::PemObject::pem_slice_iter(hook.ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(musubi_identity::crypto::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(hook.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    let head = format!(
        "POST /inject HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(body).await.unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn malformed_reviews_are_answered_and_the_webhook_keeps_serving() {
    let api = musubi_tests::api_server_or_skip!();
    let kube = api.client().await;
    let hook = start_webhook(&kube).await;
    let id = "inject-b";
    register(&kube, &hook, id).await;
    let ns = support::namespace(
        &kube,
        "garbage",
        &[("musubi.io/inject", "enabled")],
        &[("musubi-test-webhook", id)],
    )
    .await;
    support::service_account(&kube, &ns, "web").await;

    let cases: &[(&[u8], &str)] = &[
        (b"{not json", "not an AdmissionReview"),
        (
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
            "no request",
        ),
        (&[0xff, 0xfe, 0x00], "not an AdmissionReview"),
    ];
    for (body, says) in cases {
        let resp = post_raw(&hook, body).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
        assert!(resp.contains(says), "{resp}");
    }
    // A well-formed review of an unreadable pod is allowed, unmodified, with a warning.
    let odd = serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": { "uid": "x-1", "namespace": ns, "object": { "spec": { "containers": 3 } } },
    }))
    .unwrap();
    let resp = post_raw(&hook, &odd).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.contains(r#""allowed":true"#) && resp.contains("could not be read"),
        "{resp}"
    );
    assert!(!resp.contains("patch\""), "{resp}");

    // Still serving: the API server's next pod is injected.
    let pod = create_deployment_pod(&kube, &ns, &deployment("web", json!({}))).await;
    assert_eq!(init_names(&pod), ["musubi-init", "musubi-proxy"]);
}

#[tokio::test]
async fn musubi_inject_output_passes_server_side_validation() {
    let api = musubi_tests::api_server_or_skip!();
    let kube = api.client().await;
    let ns = support::namespace(&kube, "manual", &[], &[]).await;
    let manifests = format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{ name: web, namespace: {ns} }}
spec:
  selector: {{ matchLabels: {{ app: web }} }}
  template:
    metadata: {{ labels: {{ app: web }} }}
    spec:
      containers: [{{ name: app, image: web:1, ports: [{{ containerPort: 8080 }}] }}]
---
apiVersion: batch/v1
kind: CronJob
metadata: {{ name: nightly, namespace: {ns} }}
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers: [{{ name: job, image: job:1 }}]
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {{ name: agent, namespace: {ns} }}
spec:
  selector: {{ matchLabels: {{ app: agent }} }}
  template:
    metadata: {{ labels: {{ app: agent }}, annotations: {{ musubi.io/opaque-ports: "5432" }} }}
    spec:
      containers: [{{ name: agent, image: agent:1 }}]
"#
    );
    let (out, outcomes) =
        musubi_injector::manifest::inject(&manifests, &InjectConfig::with_anchors(anchors()))
            .unwrap();
    assert!(
        outcomes.iter().all(|o| o.result == "injected"),
        "{outcomes:?}"
    );
    let result = kubectl_apply_dry_run(api, &out);
    assert!(
        result.status.success(),
        "kubectl apply --dry-run=server refused the injected manifests:\n{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let said = String::from_utf8_lossy(&result.stdout);
    assert!(
        said.contains("deployment.apps/web created (server dry run)"),
        "{said}"
    );
    // And the schema check is real: a broken injected field is refused.
    let broken = out.replacen("restartPolicy: Always", "restartPolicy: Sometimes", 1);
    let result = kubectl_apply_dry_run(api, &broken);
    assert!(
        !result.status.success(),
        "a bad restartPolicy must be refused"
    );
}

fn kubectl_apply_dry_run(api: &ApiServer, manifests: &str) -> std::process::Output {
    let mut cmd = api.tool("kubectl");
    cmd.args(["apply", "--dry-run=server", "-f", "-"]);
    support::with_stdin(cmd, manifests)
}
