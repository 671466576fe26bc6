//! The controller end to end: real streams over real mTLS, file edits reaching proxies, bad
//! edits refused, and traffic that survives a controller restart.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: fail loudly

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use musubi_proto::discovery::v1::{WatchRequest, discovery_client::DiscoveryClient};
use musubi_tests::mesh::{Controller, Proxy, Setup, proxy};
use musubi_tests::{Identity, apps, eventually};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;

async fn get(outbound: SocketAddr, uri: &str) -> (StatusCode, String) {
    let tcp = TcpStream::connect(outbound).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            Request::get(uri)
                .body(Full::<Bytes>::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn mesh_yaml(app_port: u16, server: &Proxy, extra_endpoint: bool, allow_web: bool) -> String {
    let extra = if extra_endpoint {
        format!(
            "\n      - {{ address: 127.0.0.2, port: {app_port}, serviceAccount: api, proxyPort: {} }}",
            server.running.inbound.port()
        )
    } else {
        String::new()
    };
    let allow = if allow_web {
        "spiffe://cluster.local/ns/shop/sa/web"
    } else {
        "spiffe://cluster.local/ns/shop/sa/admin"
    };
    format!(
        r#"
services:
  - name: api
    namespace: shop
    port: 80
    protocol: http
    endpoints:
      - {{ address: 127.0.0.1, port: {app_port}, serviceAccount: api, proxyPort: {proxy} }}{extra}
workloads:
  - namespace: shop
    serviceAccount: api
    ports:
      - port: {app_port}
        allow:
          - identity: {allow}
"#,
        proxy = server.running.inbound.port()
    )
}

#[tokio::test]
async fn streams_follow_file_edits_and_refuse_bad_ones() {
    let identity = Identity::start().await;
    let yaml = "services:\n  - name: api\n    namespace: shop\n    port: 80\n    endpoints:\n      - { address: 127.0.0.1, port: 9001, serviceAccount: api }\n";
    let controller = Controller::start(&identity, yaml).await;
    let store = identity.svid("shop", "web").await;
    let channel = musubi_proxy::control::channel(
        &controller.addr.to_string(),
        &identity.ca.bundle,
        store,
        controller.id.clone(),
    )
    .unwrap();
    let mut client = DiscoveryClient::new(channel);
    let mut stream = client
        .watch(WatchRequest {
            target: "api.shop:80".into(),
            context_namespace: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.service.as_ref().unwrap().endpoints.len(), 1);

    let two = format!("{yaml}      - {{ address: 127.0.0.2, port: 9001, serviceAccount: api }}\n");
    assert!(controller.edit(&two).await.unwrap());
    let second = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(second.service.as_ref().unwrap().endpoints.len(), 2);
    assert!(second.version > first.version);

    // A broken edit is refused with its line; the stream does not change.
    let broken = format!("{two}      - {{ address: not-an-ip, port: 9001 }}\n");
    let err = controller.edit(&broken).await.unwrap_err().to_string();
    assert!(
        err.contains("line 8") && err.contains("not an IP address"),
        "{err}"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stream.message())
            .await
            .is_err(),
        "no update for a refused edit"
    );

    // Unknown targets are answered, bad ones refused.
    let mut other = client
        .watch(WatchRequest {
            target: "nothing.here:80".into(),
            context_namespace: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(other.message().await.unwrap().unwrap().unknown);
    let status = client
        .watch(WatchRequest {
            target: "no-port".into(),
            context_namespace: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // Without a client certificate the controller refuses the connection.
    let channel = musubi_identity::client::connect(
        &controller.addr.to_string(),
        &identity.ca.bundle,
        controller.id.clone(),
    )
    .unwrap();
    let status = DiscoveryClient::new(channel)
        .watch(WatchRequest {
            target: "api.shop:80".into(),
            context_namespace: String::new(),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Unauthenticated
        ),
        "{status:?}"
    );
}

#[tokio::test]
async fn proxies_follow_the_controller_and_survive_its_restart() {
    let identity = Identity::start().await;
    let app = apps::http().await;
    // The mesh file names the server proxy's address, so the file is written once it runs.
    let mut controller = Controller::start(&identity, "{}").await;
    let server = proxy(
        &identity,
        "shop",
        "api",
        Setup {
            app_ports: vec![app.port()],
            controller: Some(controller.endpoint()),
            ..Setup::default()
        },
    )
    .await;
    controller
        .edit(&mesh_yaml(app.port(), &server, false, true))
        .await
        .unwrap();
    let client = proxy(
        &identity,
        "shop",
        "web",
        Setup {
            controller: Some(controller.endpoint()),
            ..Setup::default()
        },
    )
    .await;

    let (status, body) = get(client.running.outbound, "http://api.shop:80/one").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains("client-id=spiffe://cluster.local/ns/shop/sa/web"),
        "{body}"
    );

    // Controller down: traffic keeps flowing on the last snapshot.
    controller.stop().await;
    for i in 0..5 {
        let (status, body) = get(
            client.running.outbound,
            &format!("http://api.shop:80/down-{i}"),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // Back up on the same address; the proxies resync, and a policy change reaches the server proxy.
    controller.restart(&identity).await;
    controller
        .edit(&mesh_yaml(app.port(), &server, false, false))
        .await
        .unwrap();
    eventually(
        "the new policy to deny web",
        Duration::from_secs(20),
        || {
            let outbound = client.running.outbound;
            async move {
                let (status, _) = get(outbound, "http://api.shop:80/after").await;
                (status == StatusCode::FORBIDDEN).then_some(())
            }
        },
    )
    .await;
}
