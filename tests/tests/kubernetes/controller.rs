//! The controller's Kubernetes source against the real API server, observed through the real
//! discovery and policy streams over mTLS: endpoints of a Service appear with their pods'
//! identities, an endpoint going away reaches the stream within a second, namespace
//! annotations and the policy CRDs (from the chart) reach the policy stream with every declared
//! port, and the controller (with the chart's RBAC) writes each policy object's status.

use crate::support::{self, endpoint_summary, next_matching, slice};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams};
use musubi_proto::policy::v1::{InboundPolicy, MtlsMode, PortProtocol, authorization_rule::Client};
use musubi_tests::Identity;
use musubi_tests::apiserver::ApiServer;
use serde_json::json;
use std::time::{Duration, Instant};

/// Applies the chart's CRDs and waits until the API server serves them.
fn install_crds(api: &ApiServer) {
    support::apply_crds(
        api,
        &[
            support::crd_file("meshtls"),
            support::crd_file("authorizationpolicies"),
        ],
        None,
        &["meshtls", "authorizationpolicies"],
    );
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
    // The controller runs with exactly the chart's RBAC (its status writes need it too).
    let as_controller =
        support::chart_controller_client(api, &kube, &format!("controller-{ns}")).await;
    let (running, controller_id) = support::start_controller(&as_controller, &identity).await;
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
    let mut policy = support::policy_watch(&identity, &running, &controller_id, (&ns, "api")).await;
    let default_mode = |p: &InboundPolicy| p.default_policy.as_ref().map(|d| d.mtls);
    let first = next_matching(&mut policy, "STRICT default", Duration::from_secs(5), |p| {
        default_mode(p) == Some(MtlsMode::Strict as i32)
    })
    .await;
    // The port the Service targets on the workload's pods is declared, with its appProtocol.
    let declared: Vec<(u32, i32, bool)> = first
        .ports
        .iter()
        .map(|p| (p.port, p.protocol, p.authorization.is_some()))
        .collect();
    assert_eq!(declared, [(8080, PortProtocol::Http1 as i32, false)]);
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
        let (kube, ns) = (kube.clone(), ns.clone());
        async move { support::create_policy(&kube, &ns, kind, name, spec).await }
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
    assert_eq!(
        port.protocol,
        PortProtocol::Http1 as i32,
        "the policy keeps the port's protocol"
    );
    // The controller says it uses both objects as written.
    for (kind, name) in [
        ("MeshTLS", "api-strict"),
        ("AuthorizationPolicy", "web-only"),
    ] {
        let c = support::accepted_condition(&kube, &ns, kind, name, "True").await;
        assert_eq!(c["reason"], "Accepted", "{kind} {name}: {c}");
        assert_eq!(c["observedGeneration"], 1, "{kind} {name}: {c}");
    }

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
    // SPIFFE IDs are checked by the schema: most bad ones never reach the controller.
    for (id, said) in [
        (
            "spiffe://cluster.local/ns/../sa/web",
            "identity must not have a . or .. path segment",
        ),
        (
            "spiffe://Cluster.Local/ns/shop/sa/web",
            "identity must be a SPIFFE ID",
        ),
        ("spiffe://cluster.local", "identity must be a SPIFFE ID"),
        (
            "spiffe://cluster.local/ns//sa/web",
            "identity must be a SPIFFE ID",
        ),
        (
            "https://cluster.local/ns/shop/sa/web",
            "identity must be a SPIFFE ID",
        ),
    ] {
        let bad = create(
            "AuthorizationPolicy",
            "bad-id",
            json!({ "serviceAccount": "api", "ports": [8080], "allow": [{ "identity": id }] }),
        )
        .await
        .unwrap_err();
        let msg = bad.to_string();
        assert!(
            msg.contains("spec.allow[0].identity") && msg.contains(said),
            "{id}: {msg}"
        );
    }
    running.shutdown().await;
}
