//! The controller through a kube-apiserver restart (its own API server: this test binary is
//! the only user, so restarting it disturbs no other test). The proxy's stream stays open while
//! the API server is away, and changes made after it is back reach the stream.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: fail loudly

#[path = "kubernetes/support.rs"]
#[allow(dead_code)] // shared with the kubernetes test binary, which uses all of it
mod support;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, PostParams};
use musubi_tests::Identity;
use std::time::Duration;
use support::{endpoint_summary, next_matching, slice};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_survive_an_api_server_restart() {
    let api = musubi_tests::api_server_or_skip!();
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
