//! The controller against an API server of its own (this test binary is the only user, so
//! restarting it, or installing the CRDs late, disturbs no other test; the tests here take
//! turns): the proxy's stream stays open while the API server is away, and changes made after
//! it is back reach the stream; and without the policy CRDs, discovery is served but policy is
//! not, until both have listed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: fail loudly

#[path = "kubernetes/support.rs"]
#[allow(dead_code)] // shared with the kubernetes test binary, which uses all of it
mod support;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, PostParams};
use musubi_proto::policy::v1::authorization_rule::Client;
use musubi_tests::Identity;
use serde_json::json;
use std::time::Duration;
use support::{endpoint_summary, next_matching, slice};

/// The tests here change the API server under each other: one at a time.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_survive_an_api_server_restart() {
    let api = musubi_tests::api_server_or_skip!();
    let _turn = TURN.lock().await;
    let kube = api.client().await;
    let ns = support::namespace(&kube, "restart", &[], &[]).await;
    support::service_account(&kube, &ns, "api").await;
    let identity = Identity::start().await;
    let (running, controller_id) = support::start_controller(&kube, &identity).await;
    let mut stream = support::discovery_watch(
        &identity,
        &running,
        &controller_id,
        (&ns, "web"),
        format!("api.{ns}.svc.cluster.local:80"),
    )
    .await;
    support::api_service(&kube, &ns, &[("10.1.0.1", "api-a")]).await;
    let slices = Api::<EndpointSlice>::namespaced(kube.clone(), &ns);
    next_matching(&mut stream, "one endpoint", Duration::from_secs(10), |u| {
        endpoint_summary(u).len() == 1
    })
    .await;

    tokio::task::spawn_blocking(|| api.restart_apiserver())
        .await
        .unwrap();

    // The stream was not dropped, and the watches came back: a change made now arrives.
    let mut two = slice(&ns, &[("10.1.0.1", "api-a"), ("10.1.0.2", "api-b")]);
    two.metadata.resource_version = slices.get("api-1").await.unwrap().metadata.resource_version;
    slices
        .replace("api-1", &PostParams::default(), &two)
        .await
        .unwrap();
    let update = next_matching(
        &mut stream,
        "the post-restart change",
        Duration::from_secs(30),
        |u| endpoint_summary(u).len() == 2,
    )
    .await;
    assert_eq!(endpoint_summary(&update)[1].0, "10.1.0.2");
    running.shutdown().await;
}

/// A CRD file without its CEL rules, as an older chart would have installed it (objects it
/// let in stay stored when the stricter schema comes).
fn without_validations(file: &std::path::Path) -> String {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("x-kubernetes-validations");
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut crd: serde_json::Value =
        serde_yaml::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    strip(&mut crd);
    serde_json::to_string(&crd).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_waits_for_the_policy_lists_and_a_bad_rule_narrows() {
    let api = musubi_tests::api_server_or_skip!();
    let _turn = TURN.lock().await;
    let kube = api.client().await;
    let ns = support::namespace(&kube, "closed", &[], &[]).await;
    support::service_account(&kube, &ns, "api").await;
    let identity = Identity::start().await;
    // Whatever order the tests ran in, the policy CRDs are not there now.
    let mut delete = api.tool("kubectl");
    delete.args([
        "delete",
        "--ignore-not-found",
        "--wait",
        "crd/meshtls.policy.musubi.io",
        "crd/authorizationpolicies.policy.musubi.io",
    ]);
    support::ok(&delete.output().unwrap(), "kubectl delete (CRDs)");
    let (running, controller_id) =
        support::start_controller_with(&kube, &identity, Duration::from_secs(2)).await;

    // Discovery is served.
    support::api_service(&kube, &ns, &[("10.1.0.1", "api-a"), ("10.1.0.2", "api-b")]).await;
    let mut discovery = support::discovery_watch(
        &identity,
        &running,
        &controller_id,
        (&ns, "web"),
        format!("api.{ns}.svc.cluster.local:80"),
    )
    .await;
    next_matching(
        &mut discovery,
        "both endpoints",
        Duration::from_secs(10),
        |u| endpoint_summary(u).len() == 2,
    )
    .await;
    // Policy is not: nothing at all, rather than "any authenticated client" on every port.
    let mut policy = support::policy_watch(&identity, &running, &controller_id, (&ns, "api")).await;
    assert!(
        tokio::time::timeout(Duration::from_secs(2), policy.message())
            .await
            .is_err(),
        "no policy without the policy lists"
    );

    // The AuthorizationPolicy CRD of an older chart (no CEL rules) lets a bad SPIFFE ID in.
    let authz = support::crd_file("authorizationpolicies");
    support::apply_crds(
        api,
        &[],
        Some(&without_validations(&authz)),
        &["authorizationpolicies"],
    );
    let web = format!("spiffe://cluster.local/ns/{ns}/sa/web");
    support::create_policy(
        &kube,
        &ns,
        "AuthorizationPolicy",
        "mixed",
        json!({ "serviceAccount": "api", "ports": [8080], "allow": [
            { "identity": web },
            { "identity": "spiffe://cluster.local/ns/../sa/admin" },
        ] }),
    )
    .await
    .unwrap();
    // The controller has listed it (it says so on the object), and drops the bad rule alone...
    let c = support::accepted_condition(&kube, &ns, "AuthorizationPolicy", "mixed", "False").await;
    assert_eq!(c["reason"], "InvalidRules", "{c}");
    let msg = c["message"].as_str().unwrap();
    assert!(
        msg.contains("allow[1].identity")
            && !msg.contains("allow[0]")
            && msg.contains("the others apply"),
        "{msg}"
    );
    // ... but MeshTLS is still missing: still no policy.
    assert!(
        tokio::time::timeout(Duration::from_secs(1), policy.message())
            .await
            .is_err(),
        "no policy without the MeshTLS list"
    );

    // Today's CRDs (the stored object stays; new bad IDs are refused), MeshTLS included.
    support::apply_crds(
        api,
        &[support::crd_file("meshtls"), authz],
        None,
        &["meshtls", "authorizationpolicies"],
    );
    // Within the watch's retry backoff (at most 30 s), policy arrives, narrowed.
    let p = next_matching(&mut policy, "the policy", Duration::from_secs(60), |_| true).await;
    let port = p.ports.iter().find(|pp| pp.port == 8080).unwrap();
    let rules: Vec<Client> = port
        .authorization
        .clone()
        .expect("the port has its policy's rules, not the default")
        .rules
        .into_iter()
        .map(|r| r.client.unwrap())
        .collect();
    assert_eq!(rules, [Client::Identity(web)]);
    running.shutdown().await;
}
