//! The controller's Kubernetes source against the real API server, observed through the real
//! discovery and policy streams over mTLS: endpoints of a Service appear with their pods'
//! identities, an endpoint going away reaches the stream within a second, and namespace
//! annotations and the policy CRDs (from the chart) reach the policy stream.

use crate::support::{self, endpoint_summary, next_matching, slice};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use musubi_proto::policy::v1::{
    InboundPolicy, MtlsMode, PolicyRequest, authorization_rule::Client, policy_client::PolicyClient,
};
use musubi_tests::Identity;
use musubi_tests::apiserver::ApiServer;
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

/// Applies the chart's CRDs and waits until the API server serves them.
fn install_crds(api: &ApiServer) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/musubi/crds");
    let mut apply = api.tool("kubectl");
    apply.args(["apply", "--server-side", "-f"]).arg(&dir);
    support::ok(&apply.output().unwrap(), "kubectl apply (CRDs)");
    let mut wait = api.tool("kubectl");
    wait.args(["wait", "--for=condition=Established", "--timeout=60s"])
        .args([
            "crd/meshtls.policy.musubi.io",
            "crd/authorizationpolicies.policy.musubi.io",
        ]);
    support::ok(&wait.output().unwrap(), "kubectl wait (CRDs)");
}

#[tokio::test]
async fn kubernetes_objects_reach_the_discovery_and_policy_streams() {
    let api = musubi_tests::api_server_or_skip!();
    install_crds(api);
    let kube = api.client().await;
    let ns = support::namespace(&kube, "disc", &[], &[]).await;
    for sa in ["api", "web"] {
        support::service_account(&kube, &ns, sa).await;
    }

    let identity = Identity::start().await;
    let (running, controller_id) = support::start_controller(&kube, &identity).await;
    let addr = running.addr.to_string();
    let mut discovery = support::discovery_watch(
        &identity,
        &running,
        &controller_id,
        (&ns, "web"),
        format!("api.{ns}.svc.cluster.local:80"),
    )
    .await;

    // Service + pods + EndpointSlice, as the endpoint controller would write them.
    let cluster_ip =
        support::api_service(&kube, &ns, &[("10.1.0.1", "api-a"), ("10.1.0.2", "api-b")]).await;
    let slices = Api::<EndpointSlice>::namespaced(kube.clone(), &ns);
    let api_id = format!("spiffe://cluster.local/ns/{ns}/sa/api");
    let both = next_matching(
        &mut discovery,
        "both endpoints",
        Duration::from_secs(10),
        |u| endpoint_summary(u).len() == 2,
    )
    .await;
    assert_eq!(
        endpoint_summary(&both),
        [
            ("10.1.0.1".to_string(), api_id.clone()),
            ("10.1.0.2".to_string(), api_id.clone())
        ]
    );
    // The Service's cluster IP resolves to the same service.
    let mut by_ip = support::discovery_watch(
        &identity,
        &running,
        &controller_id,
        (&ns, "web"),
        format!("{cluster_ip}:80"),
    )
    .await;
    let first = by_ip.message().await.unwrap().unwrap();
    assert_eq!(first.service.unwrap().name, "api");

    // An endpoint goes away: the stream says so within a second.
    let removed_at = Instant::now();
    slices
        .replace("api-1", &PostParams::default(), &{
            let mut s = slice(&ns, &[("10.1.0.1", "api-a")]);
            s.metadata.resource_version =
                slices.get("api-1").await.unwrap().metadata.resource_version;
            s
        })
        .await
        .unwrap();
    let one = next_matching(&mut discovery, "the removal", Duration::from_secs(1), |u| {
        endpoint_summary(u).len() == 1
    })
    .await;
    let took = removed_at.elapsed();
    assert_eq!(endpoint_summary(&one)[0].0, "10.1.0.1");
    eprintln!("endpoint removal reached the stream in {took:?}");

    // Policy: mesh default STRICT; the namespace annotation makes it PERMISSIVE; CRDs refine.
    let api_store = identity.svid(&ns, "api").await;
    let mut policy = PolicyClient::new(
        musubi_proxy::control::channel(&addr, &identity.ca.bundle, api_store, controller_id)
            .unwrap(),
    )
    .watch(PolicyRequest { ports: vec![8080] })
    .await
    .unwrap()
    .into_inner();
    let default_mode = |p: &InboundPolicy| p.default_policy.as_ref().map(|d| d.mtls);
    next_matching(&mut policy, "STRICT default", Duration::from_secs(5), |p| {
        default_mode(p) == Some(MtlsMode::Strict as i32)
    })
    .await;
    Api::<Namespace>::all(kube.clone())
        .patch(
            &ns,
            &PatchParams::default(),
            &Patch::Merge(
                json!({ "metadata": { "annotations": { "musubi.io/mtls-mode": "PERMISSIVE" } } }),
            ),
        )
        .await
        .unwrap();
    next_matching(
        &mut policy,
        "PERMISSIVE from the annotation",
        Duration::from_secs(5),
        |p| default_mode(p) == Some(MtlsMode::Permissive as i32),
    )
    .await;

    let create = |kind: &'static str, name: &'static str, spec: serde_json::Value| {
        let plural = if kind == "MeshTLS" {
            "meshtls"
        } else {
            "authorizationpolicies"
        };
        let ar = musubi_controller::kubernetes::crd_resource(kind, plural);
        let kube = kube.clone();
        let ns = ns.clone();
        async move {
            let mut obj = DynamicObject::new(name, &ar).within(&ns);
            obj.data = json!({ "spec": spec });
            Api::<DynamicObject>::namespaced_with(kube, &ns, &ar)
                .create(&PostParams::default(), &obj)
                .await
        }
    };
    create(
        "MeshTLS",
        "api-strict",
        json!({ "mode": "STRICT", "serviceAccount": "api", "ports": [8080] }),
    )
    .await
    .unwrap();
    create(
        "AuthorizationPolicy",
        "web-only",
        json!({ "serviceAccount": "api", "ports": [8080], "allow": [{ "identity": format!("spiffe://cluster.local/ns/{ns}/sa/web") }] }),
    )
    .await
    .unwrap();
    let p = next_matching(&mut policy, "the CRD policy", Duration::from_secs(5), |p| {
        p.ports
            .iter()
            .any(|pp| pp.port == 8080 && pp.authorization.is_some())
    })
    .await;
    let port = p.ports.iter().find(|pp| pp.port == 8080).unwrap();
    assert_eq!(
        port.mtls,
        MtlsMode::Strict as i32,
        "MeshTLS for the port wins"
    );
    assert_eq!(default_mode(&p), Some(MtlsMode::Permissive as i32));
    let rules: Vec<Client> = port
        .authorization
        .clone()
        .unwrap()
        .rules
        .into_iter()
        .map(|r| r.client.unwrap())
        .collect();
    assert_eq!(
        rules,
        [Client::Identity(format!(
            "spiffe://cluster.local/ns/{ns}/sa/web"
        ))]
    );

    // The API server refuses what the schema forbids.
    let bad = create("MeshTLS", "bad", json!({ "mode": "SOMETIMES" }))
        .await
        .unwrap_err();
    assert!(bad.to_string().contains("SOMETIMES"), "{bad}");
    let bad = create(
        "MeshTLS",
        "bad2",
        json!({ "mode": "STRICT", "ports": [80] }),
    )
    .await
    .unwrap_err();
    assert!(
        bad.to_string()
            .contains("ports can only be set together with serviceAccount"),
        "{bad}"
    );
    running.shutdown().await;
}
