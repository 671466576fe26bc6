//! The controller through a kube-apiserver restart (its own API server: this test binary is
//! the only user, so restarting it disturbs no other test). The proxy's stream stays open while
//! the API server is away, and changes made after it is back reach the stream.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: fail loudly

#[path = "kubernetes/support.rs"]
#[allow(dead_code)] // shared with the kubernetes test binary, which uses all of it
mod support;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, PostParams};
use musubi_proto::discovery::v1::{WatchRequest, discovery_client::DiscoveryClient};
use musubi_tests::Identity;
use serde_json::json;
use std::time::Duration;
use support::{endpoint_summary, meshed_pod, next_matching, slice};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_survive_an_api_server_restart() {
    let api = musubi_tests::api_server_or_skip!();
    let kube = api.client().await;
    let ns = support::namespace(&kube, "restart", &[], &[]).await;
    support::service_account(&kube, &ns, "api").await;
    let identity = Identity::start().await;
    let (running, controller_id) = support::start_controller(&kube, &identity).await;
    let channel = musubi_proxy::control::channel(
        &running.addr.to_string(),
        &identity.ca.bundle,
        identity.svid(&ns, "web").await,
        controller_id,
    )
    .unwrap();
    let mut stream = DiscoveryClient::new(channel)
        .watch(WatchRequest {
            target: format!("api.{ns}.svc.cluster.local:80"),
            context_namespace: ns.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let pods = Api::<Pod>::namespaced(kube.clone(), &ns);
    for (name, ip) in [("api-a", "10.1.0.1"), ("api-b", "10.1.0.2")] {
        pods.create(&PostParams::default(), &meshed_pod(name, "api", ip))
            .await
            .unwrap();
    }
    let svc: Service = serde_json::from_value(json!({
        "metadata": { "name": "api" },
        "spec": { "ports": [{ "name": "http", "port": 80, "targetPort": 8080 }] },
    }))
    .unwrap();
    Api::<Service>::namespaced(kube.clone(), &ns)
        .create(&PostParams::default(), &svc)
        .await
        .unwrap();
    let slices = Api::<EndpointSlice>::namespaced(kube.clone(), &ns);
    slices
        .create(
            &PostParams::default(),
            &slice(&ns, &[("10.1.0.1", "api-a")]),
        )
        .await
        .unwrap();
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
