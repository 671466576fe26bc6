//! Gateway API routes against the real API server (Gateway API v1.6.3 CRDs from their Go
//! module, Musubi's FaultInjection CRD from the chart), with the controller running under the
//! chart's RBAC: each of the seed's routing examples (examples/routing/gateway/) reaches the
//! discovery stream exactly as the same example written in the mesh file does, and each route
//! gets `Accepted` / `ResolvedRefs` on its status; bad routes and faults are refused with their
//! reasons, alone.

use crate::support::{self, next_matching, ok, with_stdin};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DynamicObject, PostParams};
use musubi_controller::kubernetes::route_status::{CONTROLLER_NAME, resource};
use musubi_controller::model::gateway::RouteKind;
use musubi_proto::discovery::v1 as dpb;
use musubi_tests::Identity;
use musubi_tests::apiserver::ApiServer;
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// Gateway API's route CRDs (fetched by scripts/gateway-api-crds.sh) and the chart's.
fn install_crds(api: &ApiServer) {
    let fetched = std::process::Command::new(repo("scripts/gateway-api-crds.sh"))
        .output()
        .unwrap();
    ok(&fetched, "scripts/gateway-api-crds.sh");
    let mut apply = api.tool("kubectl");
    apply.args(["apply", "--server-side", "--force-conflicts"]);
    for f in ["httproutes", "grpcroutes"] {
        apply
            .arg("-f")
            .arg(repo(&format!("charts/musubi/gateway-api/{f}.yaml")));
    }
    ok(&apply.output().unwrap(), "kubectl apply (Gateway API CRDs)");
    let mut wait = api.tool("kubectl");
    wait.args(["wait", "--for=condition=Established", "--timeout=60s"]);
    wait.args([
        "crd/httproutes.gateway.networking.k8s.io",
        "crd/grpcroutes.gateway.networking.k8s.io",
    ]);
    ok(&wait.output().unwrap(), "kubectl wait (Gateway API CRDs)");
    support::apply_crds(
        api,
        &[
            support::crd_file("meshtls"),
            support::crd_file("authorizationpolicies"),
            support::crd_file("faultinjections"),
            support::crd_file("routepolicies"),
        ],
        None,
        &[
            "meshtls",
            "authorizationpolicies",
            "faultinjections",
            "routepolicies",
        ],
    );
}

/// `kubectl apply` of YAML text in namespace `ns`; returns the error text when refused.
fn apply(api: &ApiServer, ns: &str, yaml: &str) -> Result<(), String> {
    let mut cmd = api.tool("kubectl");
    cmd.args(["apply", "-n", ns, "-f", "-"]);
    let out = with_stdin(cmd, &yaml.replace("k1s0-service", ns));
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn delete(api: &ApiServer, ns: &str, yaml: &str) {
    let mut cmd = api.tool("kubectl");
    cmd.args(["delete", "-n", ns, "--wait=true", "-f", "-"]);
    ok(
        &with_stdin(cmd, &yaml.replace("k1s0-service", ns)),
        "kubectl delete",
    );
}

/// Pods (stable and canary) and the EndpointSlices the endpoint controller would write.
async fn endpoints(kube: &kube::Client, ns: &str) {
    let pods = Api::<Pod>::namespaced(kube.clone(), ns);
    let slices = Api::<EndpointSlice>::namespaced(kube.clone(), ns);
    for (svc, version, ip) in [
        ("order-server", "stable", "10.2.0.1"),
        ("order-server-canary", "canary", "10.2.0.2"),
    ] {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": { "name": format!("order-{version}"), "labels": { "app": "order-server", "version": version } },
            "spec": {
                "serviceAccountName": format!("order-{version}"),
                "initContainers": [{ "name": "musubi-proxy", "image": "proxy", "restartPolicy": "Always" }],
                "containers": [{ "name": "app", "image": "order", "ports": [{ "containerPort": 8080 }] }],
            },
            "status": { "podIP": ip },
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": { "name": format!("{svc}-1"), "labels": { "kubernetes.io/service-name": svc } },
            "addressType": "IPv4",
            "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
            "endpoints": [{ "addresses": [ip], "conditions": { "ready": true },
                            "targetRef": { "kind": "Pod", "namespace": ns, "name": format!("order-{version}") } }],
        }))
        .unwrap();
        slices.create(&PostParams::default(), &slice).await.unwrap();
    }
}

/// What the mesh file makes of the same example: the routes of order-server, for comparison
/// with what the Kubernetes source serves (ranks aside: they depend on the other routes).
fn from_mesh_file(ns: &str, example: &str) -> Vec<dpb::Route> {
    let text = std::fs::read_to_string(repo(&format!("examples/routing/{example}.yaml"))).unwrap();
    let yaml = format!(
        "services:\n  - {{ name: order-server, namespace: {ns}, port: 80, protocol: http }}\n  - {{ name: order-server-canary, namespace: {ns}, port: 80, protocol: http }}\n{}",
        text.replace("k1s0-service", ns)
    );
    let state = musubi_controller::file::parse("mesh.yaml", &yaml).unwrap();
    let svc = state
        .services
        .iter()
        .find(|s| s.name == "order-server")
        .unwrap();
    unranked(&svc.proto.routes)
}

fn unranked(routes: &[dpb::Route]) -> Vec<dpb::Route> {
    routes
        .iter()
        .cloned()
        .map(|r| dpb::Route { rank: 0, ..r })
        .collect()
}

fn routes_of(u: &dpb::ServiceUpdate) -> Vec<dpb::Route> {
    u.service
        .as_ref()
        .map(|s| unranked(&s.routes))
        .unwrap_or_default()
}

/// Our entry in the route's status, once its conditions say `accepted` and `resolved`.
async fn route_status(
    kube: &kube::Client,
    ns: &str,
    kind: RouteKind,
    name: &str,
    accepted: &str,
    resolved: &str,
) -> Value {
    let ar = resource(kind);
    let api = Api::<DynamicObject>::namespaced_with(kube.clone(), ns, &ar);
    musubi_tests::eventually(
        &format!(
            "{} {ns}/{name} to say Accepted={accepted} ResolvedRefs={resolved}",
            kind.name()
        ),
        Duration::from_secs(20),
        || {
            let api = api.clone();
            async move {
                let o = api.get(name).await.ok()?;
                let entry = o.data["status"]["parents"]
                    .as_array()?
                    .iter()
                    .find(|p| p["controllerName"] == CONTROLLER_NAME)?
                    .clone();
                let cond = |t: &str| {
                    entry["conditions"]
                        .as_array()
                        .and_then(|c| c.iter().find(|c| c["type"] == t).cloned())
                };
                let fresh =
                    cond("Accepted")?["observedGeneration"].as_i64() == o.metadata.generation;
                (fresh
                    && cond("Accepted")?["status"] == accepted
                    && cond("ResolvedRefs")?["status"] == resolved)
                    .then_some(entry)
            }
        },
    )
    .await
}

#[tokio::test]
async fn gateway_api_routes_reach_the_stream_as_the_mesh_file_does_with_status() {
    let api = musubi_tests::api_server_or_skip!();
    install_crds(api);
    let kube = api.client().await;
    let ns = support::namespace(&kube, "routes", &[], &[]).await;
    for sa in ["order-stable", "order-canary", "web"] {
        support::service_account(&kube, &ns, sa).await;
    }
    let identity = Identity::start().await;
    let as_controller =
        support::chart_controller_client(api, &kube, &format!("controller-{ns}")).await;
    let (running, controller_id) = support::start_controller(&as_controller, &identity).await;
    apply(
        api,
        &ns,
        &std::fs::read_to_string(repo("examples/routing/gateway/services.yaml")).unwrap(),
    )
    .unwrap();
    endpoints(&kube, &ns).await;
    let target = format!("order-server.{ns}.svc.cluster.local:80");
    let mut stream = support::discovery_watch(
        &identity,
        &running,
        &controller_id,
        (&ns, "web"),
        target.clone(),
    )
    .await;

    for example in ["canary", "header", "mirror", "delay", "abort", "timeout"] {
        let yaml =
            std::fs::read_to_string(repo(&format!("examples/routing/gateway/{example}.yaml")))
                .unwrap();
        let want = from_mesh_file(&ns, example);
        apply(api, &ns, &yaml).unwrap_or_else(|e| panic!("{example}: {e}"));
        let got = next_matching(
            &mut stream,
            &format!("the {example} routes"),
            Duration::from_secs(10),
            |u| routes_of(u) == want,
        )
        .await;
        assert_eq!(routes_of(&got), want, "{example}");
        let name = yaml
            .lines()
            .skip_while(|l| !l.contains("kind: HTTPRoute"))
            .find_map(|l| l.trim().strip_prefix("name: "))
            .unwrap()
            .to_string();
        let entry = route_status(&kube, &ns, RouteKind::Http, &name, "True", "True").await;
        assert_eq!(
            entry["parentRef"]["name"], "order-server",
            "{example}: {entry}"
        );
        delete(api, &ns, &yaml);
        next_matching(
            &mut stream,
            "the routes to go",
            Duration::from_secs(10),
            |u| routes_of(u).is_empty(),
        )
        .await;
    }

    // A backend that does not exist: the route is accepted, its share answers 500, and the
    // status says why.
    let missing = std::fs::read_to_string(repo("examples/routing/gateway/canary.yaml"))
        .unwrap()
        .replace("order-server-canary", "order-server-nowhere");
    apply(api, &ns, &missing).unwrap();
    let got = next_matching(
        &mut stream,
        "the route with a missing backend",
        Duration::from_secs(10),
        |u| !routes_of(u).is_empty(),
    )
    .await;
    let backends = &routes_of(&got)[0].backends;
    assert!(backends[0].invalid.is_empty());
    assert!(
        backends[1].invalid.contains("BackendNotFound"),
        "{:?}",
        backends[1]
    );
    let entry = route_status(&kube, &ns, RouteKind::Http, "order-server", "True", "False").await;
    assert_eq!(
        entry["conditions"][1]["reason"], "BackendNotFound",
        "{entry}"
    );

    // A regular expression that does not compile: refused alone; the other route still serves.
    let bad = format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{ name: bad-regex, namespace: {ns} }}
spec:
  parentRefs: [{{ group: "", kind: Service, name: order-server, port: 80 }}]
  rules:
    - matches: [{{ path: {{ type: RegularExpression, value: "/v[0-9" }} }}]
      backendRefs: [{{ name: order-server, port: 80 }}]
"#
    );
    apply(api, &ns, &bad).unwrap();
    let entry = route_status(&kube, &ns, RouteKind::Http, "bad-regex", "False", "True").await;
    assert_eq!(entry["conditions"][0]["reason"], "UnsupportedValue");
    assert!(
        entry["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("does not parse"),
        "{entry}"
    );
    let now = stream_now(&identity, &running, &controller_id, &ns, &target).await;
    assert_eq!(
        routes_of(&now).len(),
        1,
        "only the good route: {:?}",
        routes_of(&now)
    );

    // The FaultInjection schema refuses what it can (both statuses), with its message.
    let both = format!(
        "apiVersion: policy.musubi.io/v1alpha1\nkind: FaultInjection\nmetadata: {{ name: both, namespace: {ns} }}\nspec: {{ abort: {{ httpStatus: 503, grpcStatus: 14, percentage: 5 }} }}\n"
    );
    let err = apply(api, &ns, &both).unwrap_err();
    assert!(err.contains("exactly one of httpStatus"), "{err}");
    let empty = format!(
        "apiVersion: policy.musubi.io/v1alpha1\nkind: FaultInjection\nmetadata: {{ name: empty, namespace: {ns} }}\nspec: {{}}\n"
    );
    assert!(
        apply(api, &ns, &empty)
            .unwrap_err()
            .contains("a delay, an abort or both")
    );
    // What the schema cannot: the controller refuses it on its status.
    let short = format!(
        "apiVersion: policy.musubi.io/v1alpha1\nkind: FaultInjection\nmetadata: {{ name: short, namespace: {ns} }}\nspec: {{ delay: {{ fixedDelay: 0ms, percentage: 5 }} }}\n"
    );
    apply(api, &ns, &short).unwrap();
    let c = support::accepted_condition(&kube, &ns, "FaultInjection", "short", "False").await;
    assert!(
        c["message"].as_str().unwrap().contains("at least 1ms"),
        "{c}"
    );
}

/// A fresh stream's first answer: what the controller serves now.
async fn stream_now(
    identity: &Identity,
    running: &musubi_controller::RunningController,
    controller_id: &musubi_identity::SpiffeId,
    ns: &str,
    target: &str,
) -> dpb::ServiceUpdate {
    let mut s = support::discovery_watch(
        identity,
        running,
        controller_id,
        (ns, "web"),
        target.to_string(),
    )
    .await;
    s.message().await.unwrap().unwrap()
}
